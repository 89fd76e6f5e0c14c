"""Reward functions: `Sample -> float`. Built-ins by name, anything else by import path `pkg.module:fn`."""
from __future__ import annotations

from typing import Callable

from vime.registry import load_callable
from vime.rewards.arithmetic import arithmetic_reward
from vime.rewards.math import exact_match, math_reward
from vime.types import Sample

BUILTIN: dict[str, Callable[[Sample], float]] = {
    "exact_match": exact_match,
    "math": math_reward,
    "arithmetic": arithmetic_reward,
}


def get_reward_fn(name: str) -> Callable[[Sample], float]:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r} (rollout.reward); built-ins: {sorted(BUILTIN)}, "
                         "or give 'package.module:function'")
    return load_callable(name, 1, what="reward function (rollout.reward)")
