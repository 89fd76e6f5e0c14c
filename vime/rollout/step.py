"""One rollout step, the same for `vime train` and `vime rollout`: the next prompts through the rollout function,
the groups into the buffer (where the filters run), and optionally onto disk."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vime.data.buffer import FILTERS, DataBuffer
from vime.data.source import PromptSource
from vime.rollout import ROLLOUTS
from vime.rollout.config import DynamicSamplingConfig
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
        dynamic: DynamicSamplingConfig | None = None,
        max_failure_rate: float = 1.0,
    ):
        self.fn: Any = ROLLOUTS.get(fn)
        self.source, self.buffer, self.ctx = source, buffer, ctx
        self.batch_size, self.samples_dir, self.dynamic = batch_size, samples_dir, dynamic
        self.max_failure_rate = max_failure_rate
        self.accounting: dict[str, float] = {}  # the last step's sample counts
        # the async loop's feed re-issues in-flight and stale prompts before new ones
        self.draw: Callable[[int], list[dict[str, Any]]] = source.next_batch

    def __call__(self, step: int) -> list[Group]:
        """Sample `batch_size` prompts; with dynamic sampling, sample more while the filters left fewer than
        `batch_size` groups (at most `max_rounds` rounds), and keep only `batch_size` of them."""
        self.ctx.step = step
        before, failed_before = self.buffer.num_samples(), self.ctx.faults.failed()
        groups: list[Group] = []
        drawn, rounds, missing = 0, 0, self.batch_size
        while missing > 0 and (rounds == 0 or (self.dynamic is not None and rounds < self.dynamic.max_rounds)):
            factor = self.dynamic.over_sampling if self.dynamic is not None else 1.0
            prompts = self.prompts(step, self.batch_size if rounds == 0 else math.ceil(missing * factor))
            new: list[Group] = asyncio.run(self.fn(prompts, self.ctx))
            stamp_data_index(new, prompts)
            self.buffer.add(new)
            groups += new
            drawn, rounds = drawn + len(prompts), rounds + 1
            missing = self.batch_size - len(self.buffer)
        over = self.buffer.trim(self.batch_size)  # a refill round may overshoot: train on one batch's worth
        if self.samples_dir is not None:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            write_jsonl([s for g in groups for s in g], self.samples_dir / f"step_{step + 1:06d}.jsonl")
        generated = sum(len(g) for g in groups)
        expected = drawn * self.ctx.params.n
        failed = self.ctx.faults.failed() - failed_before
        self.ctx.faults.check_step(step, expected, generated, failed, self.max_failure_rate)
        self.accounting = {
            "samples/expected": float(expected),
            "samples/generated": float(generated),
            "samples/dropped_by_filter": float(generated - over - (self.buffer.num_samples() - before)),
            "samples/dropped_over_sampled": float(over),
            "rollout/sampling_rounds": float(rounds),
        }
        if self.ctx.gateway is not None:  # errors the agents were answered with, by status class
            self.accounting |= self.ctx.gateway.take_counts()
        return groups

    def prompts(self, step: int, n: int) -> list[dict[str, Any]]:
        prompts = self.draw(n)
        if len(prompts) < n:
            raise RuntimeError(
                f"the prompt data ran out at step {step + 1}: {len(prompts)} of {n} prompts (rollout.batch_size="
                f"{self.batch_size}) left after data.epochs={self.source.cfg.epochs} over "
                f"{self.source.cfg.path}; raise data.epochs or lower loop.num_steps"
            )
        return prompts


def stamp_data_index(groups: list[Group], prompts: list[dict[str, Any]]) -> None:
    """Each sample names its data row (`metadata["data_index"]`): what a stale group re-issues, and what proves on
    resume that every prompt was trained once. A rollout function that returns one group per prompt, in order,
    gets it stamped here; one that drops groups stamps its own."""
    if len(groups) != len(prompts):
        return
    for g, rec in zip(groups, prompts):
        for s in g:
            s.metadata.setdefault("data_index", rec.get("index"))


def make_buffer(filters: list[str]) -> DataBuffer:
    return DataBuffer([FILTERS.get(name) for name in filters])
