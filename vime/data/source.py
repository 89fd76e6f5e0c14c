"""Prompts from a JSONL file: seeded shuffle per epoch, a position that checkpoints and resumes exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="JSONL file, one prompt record per line")
    prompt_key: str = "prompt"
    label_key: str = "label"
    eval_path: str | None = None
    shuffle: bool = True
    seed: int = 0
    epochs: int | None = Field(default=None, ge=1, description="stop after this many passes; None = forever")
    apply_chat_template: bool = True
    system_prompt: str | None = None


def read_records(path: str | Path, prompt_key: str, label_key: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist (data.path / data.eval_path)")
    records: list[dict[str, Any]] = []
    with open(p) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: not valid JSON ({e})") from e
            if prompt_key not in rec:
                raise KeyError(f"{p}:{i}: no key {prompt_key!r} (set data.prompt_key); keys: {sorted(rec)}")
            records.append(
                {"prompt": rec[prompt_key], "label": rec.get(label_key), "index": len(records), "record": rec}
            )
    if not records:
        raise ValueError(f"data file {str(p)!r} has no records")
    return records


class PromptSource:
    """Hands out batches of prompt records. The order is a pure function of (seed, epoch), so saving
    (epoch, offset) is enough to resume on the very same prompts."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.records = read_records(cfg.path, cfg.prompt_key, cfg.label_key)
        self.epoch = 0
        self.offset = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        if self.cfg.shuffle:
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def capacity(self) -> int | None:
        """Prompts this source hands out in all (None: endless)."""
        return None if self.cfg.epochs is None else self.cfg.epochs * len(self.records)

    def exhausted(self) -> bool:
        return self.cfg.epochs is not None and self.epoch >= self.cfg.epochs

    def next_batch(self, size: int) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        while len(batch) < size and not self.exhausted():
            if self.offset >= len(self._order):
                self.epoch += 1
                self.offset = 0
                self._order = self._permutation(self.epoch)
                continue
            batch.append(self.records[self._order[self.offset]])
            self.offset += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)
