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
        self.accounting: dict[str, float] = {}  # the last step's sample counts

    def __call__(self, step: int) -> list[Group]:
        self.ctx.step = step
        prompts = self.source.next_batch(self.batch_size)
        if len(prompts) < self.batch_size:
            raise RuntimeError(
                f"the prompt data ran out at step {step + 1}: {len(prompts)} of rollout.batch_size="
                f"{self.batch_size} prompts left after data.epochs={self.source.cfg.epochs} over "
                f"{self.source.cfg.path}; raise data.epochs or lower loop.num_steps"
            )
        groups: list[Group] = asyncio.run(self.fn(prompts, self.ctx))
        if self.samples_dir is not None:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            write_jsonl([s for g in groups for s in g], self.samples_dir / f"step_{step + 1:06d}.jsonl")
        before = self.buffer.num_samples()
        self.buffer.add(groups)
        generated = sum(len(g) for g in groups)
        self.accounting = {
            "samples/expected": float(len(prompts) * self.ctx.params.n),
            "samples/generated": float(generated),
            "samples/dropped_by_filter": float(generated - (self.buffer.num_samples() - before)),
        }
        return groups


def make_buffer(filters: list[str]) -> DataBuffer:
    return DataBuffer([FILTERS.get(name) for name in filters])
