"""The rollout section of a recipe: how many prompts and samples a step draws, how they are sampled and scored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DynamicSamplingConfig(BaseModel):
    """DAPO's dynamic sampling: groups the filters drop (all-equal rewards teach nothing) are replaced by sampling
    more prompts, so every step trains on a full batch."""

    model_config = ConfigDict(extra="forbid")

    over_sampling: float = Field(default=1.0, ge=1.0, description="prompts drawn per missing group, each round")
    max_rounds: int = Field(default=3, ge=1, description="rounds of sampling per step before training on what there is")


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
    dynamic_sampling: DynamicSamplingConfig | None = Field(
        default=None, description="refill groups the filters dropped (needs rollout.group_filters)"
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
    on_history_rewrite: Literal["train", "drop", "fail"] = Field(
        default="train",
        description="agent rollouts: a recorded branch whose history the agent rewrote (its earlier turns are "
        "re-rendered text, mask 0) is trained on, dropped (counted as failed/history_rewrites), or fails the step",
    )
    max_failure_rate: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="a step whose failed share of rollout items (agent errors included) is above this stops the run",
    )
    sampling_extra: dict[str, Any] = Field(default_factory=dict, description="extra engine sampling params")

    @model_validator(mode="after")
    def _refill_needs_a_filter(self) -> RolloutConfig:
        if self.dynamic_sampling is not None and not self.group_filters:
            raise ValueError(
                "rollout.dynamic_sampling refills groups that rollout.group_filters drop: set a filter "
                "(e.g. group_filters: [drop_uniform_reward])"
            )
        return self
