"""The algorithm section of a recipe: how groups become a training batch and which loss trains on it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vime.algorithms.advantages import grpo_advantages
from vime.types import Group, Sample


class AlgorithmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    loss: str = Field(default="policy", description="built-in loss name or 'pkg.module:fn'")
    clip_low: float = 0.2
    clip_high: float = Field(default=0.2, description="DAPO's clip-higher: set above clip_low")
    kl_coef: float = 0.0
    old_logprobs: Literal["recompute", "rollout"] = Field(
        default="recompute", description="importance-ratio denominator: trainer's recomputed or engine's"
    )
    temperature: float | None = Field(default=None, description="defaults to rollout.temperature")

    def loss_kwargs(self) -> dict[str, float]:
        return {"clip_low": self.clip_low, "clip_high": self.clip_high, "kl_coef": self.kl_coef}


def assign_advantages(groups: list[Group], cfg: AlgorithmConfig) -> list[Sample]:
    """GRPO normalises by the group's reward std; Dr. GRPO and DAPO only subtract the group mean."""
    out: list[Sample] = []
    for g in groups:
        for s, a in zip(g, grpo_advantages(g, normalize_std=cfg.name == "grpo")):
            s.advantage = a
            out.append(s)
    return out
