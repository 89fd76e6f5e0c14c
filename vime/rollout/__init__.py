"""Rollout: turning prompts into scored groups of samples through the engines."""

from __future__ import annotations

from typing import Any

from vime.registry import Registry

# `rollout.function`: async fn(prompts, ctx) -> list[Group]
ROLLOUTS: Registry[Any] = Registry(
    "rollout function",
    "rollout.function",
    {"default": "vime.rollout.default:generate_groups", "agent": "vime.rollout.agent:agent_rollout"},
    n_args=2,
)
