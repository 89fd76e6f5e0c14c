"""Evaluation: greedy accuracy on the held-out set, through the same rollout function as training but with its
own sampling context, so the training seeds and counters are untouched by an eval."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from vime.data.source import DataConfig, PromptSource
from vime.rollout.context import RolloutContext


class Evaluator:
    def __init__(self, data: DataConfig, size: int, fn: Any, ctx: RolloutContext):
        self.data, self.size, self.fn, self.ctx = data, size, fn, ctx
        self.records: list[dict[str, Any]] | None = None  # read the eval file once, not at every eval

    def __call__(self) -> float:
        if not self.data.eval_path:
            return float("nan")
        if self.records is None:
            eval_data = DataConfig(**{**self.data.model_dump(), "path": self.data.eval_path, "shuffle": False})
            self.records = PromptSource(eval_data).records[: self.size]
        ctx = dataclasses.replace(
            self.ctx,
            params=dataclasses.replace(self.ctx.params, n=1, temperature=0.0, routed_experts=False),
            seed_base=None,
            data_source=str(self.data.eval_path),
            counters={"prompts": 0},
        )
        groups = asyncio.run(self.fn(self.records, ctx))
        rewards = [s.reward or 0.0 for g in groups for s in g]
        return sum(rewards) / max(1, len(rewards))
