"""Agent rollouts: run a user's agent — a plain async function that talks to an OpenAI endpoint — for every
prompt of a batch, n times, concurrently; each run gets its own session URL, so the gateway records its exact
tokens; the recorded sessions are rewarded and become a group.

    async def my_agent(base_url: str, api_key: str, task: dict) -> Any: ...   # uses openai.AsyncOpenAI

Set `rollout.function: vime.rollout.agent:agent_rollout` and `rollout.agent: mypkg.agents:my_agent`.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from vime.registry import Registry
from vime.types import Group

# Agents are the user's code: no built-ins, only import paths; each takes (base_url, api_key, task).
AGENTS: Registry[Any] = Registry("agent", "rollout.agent", {}, n_args=3)


async def run_agent_group(agent: Any, record: dict[str, Any], ctx: Any, gateway: Any, group_id: str) -> Group:
    sids = [f"{group_id}-{k}-{uuid.uuid4().hex[:6]}" for k in range(ctx.params.n)]
    results = await asyncio.gather(
        *(agent(gateway.session_url(sid), gateway.api_key, record) for sid in sids), return_exceptions=True
    )
    group = []
    for k, (sid, result) in enumerate(zip(sids, results)):
        if sid not in gateway.store.sessions:  # the agent failed (or returned) before its first model call
            what = f"agent run {k} of data row {record.get('index')} made no model call"
            ctx.faults.record("agent_failures", what, result if isinstance(result, BaseException) else None)
            continue
        s = gateway.store.to_sample(
            sid,
            agent_result=None if isinstance(result, BaseException) else result,
            agent_error=repr(result) if isinstance(result, BaseException) else None,
        )
        gateway.store.pop(sid)
        s.index, s.label, s.group_id = k, record.get("label"), group_id
        s.metadata["task"] = record
        if isinstance(result, BaseException):
            s.reward = 0.0  # a failed episode is a real outcome of the policy: trained on with no reward
        elif not await ctx.score(s, f"agent run {k} of data row {record.get('index')}"):
            continue
        group.append(s)
    return group


async def agent_rollout(prompts: list[dict[str, Any]], ctx: Any) -> list[Group]:
    """The `RolloutFn` for agents: `ctx.gateway` is the running gateway, `ctx.agent` the agent's import path."""
    agent = AGENTS.get(ctx.agent)
    groups = await asyncio.gather(
        *(
            run_agent_group(agent, r, ctx, ctx.gateway, f"s{ctx.step}-p{r.get('index', i)}")
            for i, r in enumerate(prompts)
        )
    )
    return [g for g in groups if g]
