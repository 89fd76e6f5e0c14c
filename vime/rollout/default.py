"""The default rollout: n samples per prompt, all prompts of a batch concurrently, each group scored."""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vime.rollout.context import RolloutContext
from vime.types import Group, Sample


class RolloutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    function: str = Field(default="vime.rollout.default:generate_groups",
                          description="async fn(prompts, ctx) -> list[Group], by import path")
    batch_size: int = Field(default=8, ge=1, description="prompts per rollout step")
    n_samples: int = Field(default=8, ge=1, description="responses per prompt (the GRPO group size)")
    max_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = -1
    seed: int | None = Field(default=0, description="base sampling seed; null for unseeded sampling")
    stop: list[str] = Field(default_factory=list)
    reward: str = Field(default="math", description="built-in reward name or 'pkg.module:fn'")
    group_filters: list[str] = Field(default_factory=list,
                                     description="'drop_uniform_reward' or 'pkg.module:fn' (group -> keep?)")
    agent: str | None = Field(default=None, description="agent fn 'pkg.module:fn' for vime.rollout.agent:agent_rollout")
    sampling_extra: dict[str, Any] = Field(default_factory=dict, description="extra engine sampling params")


async def sample_group(record: dict[str, Any], ctx: RolloutContext, group_id: str) -> Group:
    prompt_ids = ctx.encode(record["prompt"])
    params = dataclasses.replace(ctx.params, seed=ctx.next_seed())
    engine = ctx.engines.pick()
    (completions,) = await engine.generate([prompt_ids], params)
    group = []
    for k, c in enumerate(completions):
        s = Sample.from_completion(prompt_ids, c, group_id=group_id, index=k, prompt=record["prompt"],
                                   label=record.get("label"), metadata={"seed": params.seed, "step": ctx.step})
        s.response = ctx.decode(s.response_ids)  # the ids are the truth; engine text may lag a partial char
        s.reward = float(ctx.reward_fn(s))
        group.append(s)
    return group


async def generate_groups(prompts: list[dict[str, Any]], ctx: RolloutContext) -> list[Group]:
    return list(await asyncio.gather(*(sample_group(r, ctx, f"s{ctx.step}-p{r.get('index', i)}")
                                       for i, r in enumerate(prompts))))
