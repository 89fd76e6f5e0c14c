"""Reward functions: `Sample -> float`. Built-ins by name, anything else by import path `pkg.module:fn`."""

from __future__ import annotations

from collections.abc import Callable

from vime.registry import Registry
from vime.rewards.arithmetic import arithmetic_reward
from vime.rewards.math import exact_match, math_reward
from vime.types import Sample

RewardFn = Callable[[Sample], float]

REWARDS: Registry[RewardFn] = Registry(
    "reward",
    "rollout.reward",
    {"exact_match": exact_match, "math": math_reward, "arithmetic": arithmetic_reward},
    n_args=1,
)


def get_reward_fn(name: str) -> RewardFn:
    return REWARDS.get(name)
