"""The default rollout: n samples per prompt, all prompts of a batch concurrently, each group scored."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from vime.rollout.context import RolloutContext
from vime.types import Group, Sample


async def sample_group(record: dict[str, Any], ctx: RolloutContext, group_id: str) -> Group:
    prompt_ids = ctx.encode(record["prompt"])
    params = dataclasses.replace(ctx.params, seed=ctx.next_seed())  # drawn even if skipped: others keep theirs
    if not ctx.fits(prompt_ids, record):
        return []
    engine = ctx.engines.pick()
    (completions,) = await engine.generate([prompt_ids], params)
    group = []
    for k, c in enumerate(completions):
        s = Sample.from_completion(
            prompt_ids,
            c,
            group_id=group_id,
            index=k,
            prompt=record["prompt"],
            label=record.get("label"),
            metadata={"seed": params.seed, "step": ctx.step},
        )
        s.response = ctx.decode(s.response_ids)  # the ids are the truth; engine text may lag a partial char
        if await ctx.score(s, f"sample {k} of data row {record.get('index')}"):
            group.append(s)
    return group


async def generate_groups(prompts: list[dict[str, Any]], ctx: RolloutContext) -> list[Group]:
    return list(
        await asyncio.gather(
            *(sample_group(r, ctx, f"s{ctx.step}-p{r.get('index', i)}") for i, r in enumerate(prompts))
        )
    )
