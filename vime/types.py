"""Data that crosses a process boundary: what engines return and what the buffer and trainer consume.

Everything here is a plain dataclass with a lossless JSON form, so samples can go to JSONL, through Ray and
into checkpoints without a custom serialiser. The one array among them, an MoE sample's routed experts, is a numpy
array (`Routes`), written to JSON as base64 of its int16 bytes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

Routes = np.ndarray  # MoE routed experts, int16 [position, layer, k]; -1: none (the trainer's router routes live)


def as_routes(x: Any, where: str) -> Routes | None:
    """Routed experts as one int16 array, from an array, nested lists or the JSON form `to_dict` writes. Not nested
    lists: a 4k-token DeepSeek-V3 sample (61 layers × top-8) is 2M ids, 3.8 MB here against 31 MB of lists, and
    every sample crosses Ray to the trainer: a pickle round trip 36× and the trainer's tensor 42× faster
    (`benchmarks/bench_routes.py`)."""
    if x is None:
        return None
    arr: Routes
    if isinstance(x, dict):
        arr = np.frombuffer(base64.b64decode(x["int16"]), dtype="<i2").reshape(x["shape"])
    else:
        arr = np.asarray(x)
    if arr.size == 0:
        return np.zeros((0, 0, 0), dtype=np.int16)
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer) or arr.min() < -1 or arr.max() > 32767:
        raise ValueError(f"{where} must be expert ids [position][layer][k] in -1..32767, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int16, copy=False)


def routes_json(r: Routes) -> dict[str, Any]:
    return {"int16": base64.b64encode(r.astype("<i2").tobytes()).decode(), "shape": list(r.shape)}


class Status(str, Enum):
    COMPLETED = "completed"  # the engine stopped on EOS or a stop string
    TRUNCATED = "truncated"  # hit max_tokens / context length
    ABORTED = "aborted"  # cut by a pause(abort) or an engine restart; may be resumed as a partial rollout


@dataclass
class SamplingParams:
    """The engine-agnostic subset every engine understands; anything else goes in `extra` verbatim."""

    n: int = 1
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None  # decode under this JSON schema (the engine's structured output)
    routed_experts: bool = False  # MoE: return the experts the engine routed every token to (routing replay, R3)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Completion:
    """One sampled continuation exactly as the engine produced it (never re-tokenised)."""

    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token, as the engine reports it
    finish_reason: str  # "stop" | "length" | "abort"
    text: str = ""
    weight_versions: list[str] = field(default_factory=list)  # one per token; empty if the engine has none
    # MoE, when asked for: the experts of every position the engine computed, prompt and response, all but the
    # last token (nothing reads its routing): [position, layer, k], every layer as the engines report them (a
    # dense layer's rows mean nothing)
    routed_experts: Routes | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.routed_experts = as_routes(self.routed_experts, "Completion.routed_experts")

    @property
    def status(self) -> Status:
        return {"stop": Status.COMPLETED, "length": Status.TRUNCATED}.get(self.finish_reason, Status.ABORTED)


@dataclass
class Sample:
    """One trajectory: the unit the buffer stores and the trainer learns from.

    `loss_mask` has one entry per response token: 1 for tokens the policy sampled, 0 for tokens inserted by the
    environment (user or tool turns in a multi-turn rollout), so those are conditioned on but not trained on.
    """

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    reward: float | None = None
    advantage: float = 0.0  # set by the algorithm from the group (e.g. GRPO), broadcast over tokens
    token_advantages: list[float] = field(default_factory=list)  # one per response token, when they differ
    status: Status = Status.COMPLETED
    weight_versions: list[str] = field(default_factory=list)
    group_id: str = ""
    index: int = 0  # position inside its group
    prompt: Any = None  # the original prompt (text or messages), for logging and rewards
    label: Any = None  # the ground truth the reward function checks against
    response: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    # the engine's, as `Completion.routed_experts`; not compared (an array): samples equal but for their routes
    # compare equal
    routed_experts: Routes | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.status = Status(self.status)
        self.routed_experts = as_routes(self.routed_experts, "Sample.routed_experts")
        if not self.loss_mask:
            self.loss_mask = [1] * len(self.response_ids)
        self.validate()

    def validate(self) -> None:
        n = len(self.response_ids)
        for name in ("logprobs", "loss_mask"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Sample.{name} has {len(getattr(self, name))} entries for {n} response tokens")
        if self.weight_versions and len(self.weight_versions) != n:
            raise ValueError(f"Sample.weight_versions has {len(self.weight_versions)} entries for {n} tokens")
        positions = len(self.prompt_ids) + n - 1
        if self.routed_experts is not None and len(self.routed_experts) != positions:
            raise ValueError(f"Sample.routed_experts covers {len(self.routed_experts)} positions, not {positions}")

    @classmethod
    def from_completion(cls, prompt_ids: list[int], c: Completion, **kw: Any) -> Sample:
        return cls(
            prompt_ids=list(prompt_ids),
            response_ids=list(c.token_ids),
            logprobs=list(c.logprobs),
            status=c.status,
            weight_versions=list(c.weight_versions),
            response=c.text,
            routed_experts=c.routed_experts,
            **kw,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        if self.routed_experts is not None:
            d["routed_experts"] = routes_json(self.routed_experts)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        return cls(**d)


Group = list[Sample]  # the n samples drawn for one prompt; advantages are computed within a group


def write_jsonl(samples: Iterable[Sample], path: str | Path) -> int:
    n = 0
    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps(s.to_dict()) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[Sample]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield Sample.from_dict(json.loads(line))
