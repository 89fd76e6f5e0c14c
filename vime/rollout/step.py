"""One rollout step, the same for `vime train` and `vime rollout`: the next prompts through the rollout function,
the groups into the buffer (where the filters run), and optionally onto disk."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from vime.data.buffer import FILTERS, DataBuffer
from vime.data.source import PromptSource
from vime.rollout import ROLLOUTS
from vime.rollout.context import RolloutContext
from vime.types import Group, write_jsonl


class RolloutStep:
    def __init__(
        self,
        fn: str,
        source: PromptSource,
        buffer: DataBuffer,
        ctx: RolloutContext,
        batch_size: int,
        samples_dir: Path | None = None,
    ):
        self.fn: Any = ROLLOUTS.get(fn)
        self.source, self.buffer, self.ctx = source, buffer, ctx
        self.batch_size, self.samples_dir = batch_size, samples_dir

    def __call__(self, step: int) -> list[Group]:
        self.ctx.step = step
        groups: list[Group] = asyncio.run(self.fn(self.source.next_batch(self.batch_size), self.ctx))
        if self.samples_dir is not None:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            write_jsonl([s for g in groups for s in g], self.samples_dir / f"step_{step + 1:06d}.jsonl")
        self.buffer.add(groups)
        return groups


def make_buffer(filters: list[str]) -> DataBuffer:
    return DataBuffer([FILTERS.get(name) for name in filters])
