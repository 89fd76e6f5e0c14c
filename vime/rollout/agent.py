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
from vime.rollout.faults import RolloutFailure
from vime.types import Group, Sample

# Agents are the user's code: no built-ins, only import paths; each takes (base_url, api_key, task).
AGENTS: Registry[Any] = Registry("agent", "rollout.agent", {}, n_args=3)


async def run_agent_group(agent: Any, record: dict[str, Any], ctx: Any, gateway: Any, group_id: str) -> Group:
    sids = [f"{group_id}-{k}-{uuid.uuid4().hex[:6]}" for k in range(ctx.params.n)]
    results = await asyncio.gather(
        *(agent(gateway.session_url(sid), gateway.api_key, record) for sid in sids), return_exceptions=True
    )
    group: Group = []
    for k, (sid, result) in enumerate(zip(sids, results)):
        what, error = f"agent run {k} of data row {record.get('index')}", _error(result)
        session = gateway.store.pop(sid)
        if session is None or not any(b.turns for b in session.branches):  # failed before a model call answered
            ctx.faults.record("agent_failures", f"{what} made no model call", error)
            continue
        episode = gateway.store.samples_of(session, agent_result=None if error else result, agent_error=None)
        episode = kept_branches(episode, ctx, what)
        check_temperature(episode, ctx, what)
        if not episode:
            continue
        final = episode[-1]  # the branch updated last holds the agent's answer; the episode's reward is its
        for s in episode:
            s.index, s.label, s.group_id = k, record.get("label"), group_id
            s.metadata["task"], s.metadata["data_index"] = record, record.get("index")
        if error:
            final.reward = 0.0  # a failed episode is a real outcome of the policy: trained on with no reward
            final.metadata["agent_error"] = repr(result)
            ctx.faults.record("agent_errors", f"{what} raised after its model calls", error, skipped=False)
        elif not await ctx.score(final, what):
            continue
        for s in episode[:-1]:
            s.reward = final.reward
        group += episode
    return group


def _error(result: Any) -> BaseException | None:
    return result if isinstance(result, BaseException) else None


def kept_branches(episode: list[Sample], ctx: Any, what: str) -> list[Sample]:
    """A branch whose first prompt re-rendered assistant turns the gateway never recorded (the framework rewrote
    its history) holds sampled text as mask-0 context: trained as is, dropped, or the step fails
    (`rollout.on_history_rewrite`)."""
    inexact = [s for s in episode if not s.metadata["exact_prefix"]]
    if not inexact or ctx.on_history_rewrite == "train":
        return episode
    detail = (
        f"{what}: {len(inexact)} of its {len(episode)} branches start from a history the agent rewrote (its earlier "
        "turns were re-rendered from text, not the sampled tokens)"
    )
    if ctx.on_history_rewrite == "fail":
        raise RolloutFailure(f"{detail}; rollout.on_history_rewrite=fail")
    ctx.faults.record("history_rewrites", detail, skipped=False)
    return [s for s in episode if s.metadata["exact_prefix"]]


def check_temperature(episode: list[Sample], ctx: Any, what: str) -> None:
    """The agent picks its own sampling temperature, but the trainer scores every token at rollout.temperature:
    turns sampled at another one are trained as if drawn from a distribution they were not. Counted
    (`failed/sampling_mismatch`) and logged with both values, so it is never silent (greedy eval contexts, which
    train nothing, are not checked)."""
    want = ctx.params.temperature
    used = {t for s in episode for t in s.metadata.get("temperatures", [])}
    if want > 0 and used - {want}:
        detail = (
            f"{what} sampled at temperature {sorted(used)}, but the trainer scores its tokens at "
            f"rollout.temperature={want}: set the agent's temperature to it (or the recipe's to the agent's)"
        )
        ctx.faults.record("sampling_mismatch", detail, skipped=False)


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
