"""The rollout section of a recipe: how many prompts and samples a step draws, how they are sampled and scored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RolloutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    function: str = Field(
        default="vime.rollout.default:generate_groups",
        description="async fn(prompts, ctx) -> list[Group], by import path",
    )
    batch_size: int = Field(default=8, ge=1, description="prompts per rollout step")
    n_samples: int = Field(default=8, ge=1, description="responses per prompt (the GRPO group size)")
    max_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = -1
    seed: int | None = Field(default=0, description="base sampling seed; null for unseeded sampling")
    stop: list[str] = Field(default_factory=list)
    reward: str = Field(default="math", description="built-in reward name or 'pkg.module:fn'")
    group_filters: list[str] = Field(
        default_factory=list, description="'drop_uniform_reward' or 'pkg.module:fn' (group -> keep?)"
    )
    agent: str | None = Field(default=None, description="agent fn 'pkg.module:fn' for vime.rollout.agent:agent_rollout")
    reward_timeout_s: float = Field(
        default=60.0, gt=0, description="a reward taking longer marks its sample failed (failed/reward_timeouts)"
    )
    max_failures: int = Field(
        default=64,
        ge=0,
        description="bad items (a reward that raised, a prompt too long, an agent that failed) "
        "skipped and counted before the run stops with the first one's cause",
    )
    sampling_extra: dict[str, Any] = Field(default_factory=dict, description="extra engine sampling params")
