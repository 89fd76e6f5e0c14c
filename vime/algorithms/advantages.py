"""Advantages computed inside each group (GRPO and relatives): no critic, the group is the baseline."""

from __future__ import annotations

import statistics

from vime.types import Group


def grpo_advantages(group: Group, *, normalize_std: bool = True, eps: float = 1e-6) -> list[float]:
    rewards = [float(s.reward or 0.0) for s in group]
    mean = statistics.fmean(rewards)
    if not normalize_std or len(rewards) < 2:
        return [r - mean for r in rewards]
    std = statistics.pstdev(rewards)
    return [(r - mean) / (std + eps) for r in rewards]
