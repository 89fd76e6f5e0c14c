"""Plug-ins used by tests through import paths, as users would write them."""

import asyncio
import threading


def exploding_reward(sample):
    raise RuntimeError("reward exploded")


async def two_turn_agent(base_url, api_key, task):
    """Asks, then asks again with a follow-up user turn: a multi-turn session through the gateway."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    messages = [{"role": "user", "content": task["prompt"]}]
    r = await client.chat.completions.create(model="vime", messages=messages, max_tokens=4, seed=len(base_url))
    messages += [
        {"role": "assistant", "content": r.choices[0].message.content},
        {"role": "user", "content": "final answer?"},
    ]
    r = await client.chat.completions.create(model="vime", messages=messages, max_tokens=4)
    await client.close()
    return r.choices[0].message.content


KILLED: list[dict] = []  # what the disrupting rollouts disrupted, in order: {"port", "pids", "done_before_kill"}


async def rollout_killing_then_hanging_an_engine(prompts, ctx):
    """The default rollout, except that the first time it samples groups (n > 1, so not an eval) it SIGKILLs the
    engine's vLLM server once its requests are in flight (what a crashed engine looks like to a run), and the
    second time it SIGSTOPs the server's whole process group: alive, answering nothing (what a deadlocked engine
    looks like); only health probes can tell."""
    return await disrupt_rollout(prompts, ctx, ["kill", "stop"])


async def disrupt_rollout(prompts, ctx, hows):
    import asyncio
    import os
    import signal

    import psutil

    from engines.vllm.server import SERVER_MODULE
    from vime.rollout.default import generate_groups

    if len(KILLED) >= len(hows) or ctx.params.n == 1:
        return await generate_groups(prompts, ctx)
    how = hows[len(KILLED)]
    port = ctx.engines.engines[0].base_url.rsplit(":", 1)[1]
    server = next(
        p
        for p in psutil.process_iter(["cmdline"])
        if SERVER_MODULE in (p.info["cmdline"] or []) and port in p.info["cmdline"]
    )  # found first: the scan is slow under load, and the disruption must land while the step's requests run
    pids = [server.pid, *(c.pid for c in server.children(recursive=True))]
    task = asyncio.ensure_future(generate_groups(prompts, ctx))
    await asyncio.sleep(0.01)  # the requests are out; 64 samples take far longer than this
    if how == "kill":
        os.kill(server.pid, signal.SIGKILL)
    else:
        os.killpg(os.getpgid(server.pid), signal.SIGSTOP)
    KILLED.append({"port": port, "pids": pids, "done_before_kill": task.done()})
    return await task


REWARD_CALLS = {"n": 0}


def reward_failing_once(sample):
    """Raises for the first sample it scores, then scores like `arithmetic`: one bad item in a run."""
    from vime.rewards.arithmetic import arithmetic_reward

    REWARD_CALLS["n"] += 1
    if REWARD_CALLS["n"] == 1:
        raise ValueError("reward failed once")
    return arithmetic_reward(sample)


RELEASE = threading.Event()
HUNG_DONE = threading.Event()  # set when the hung call finally returns


def reward_hanging_once(sample):
    """Hangs on the first sample it scores (a verifier stuck on a sandbox) until RELEASE is set."""
    REWARD_CALLS["n"] += 1
    if REWARD_CALLS["n"] == 1:
        RELEASE.wait(120)
        HUNG_DONE.set()
    return 1.0


async def async_reward(sample):
    """An async verifier: awaited, not called in a thread."""
    await asyncio.sleep(0)
    return float(sample.index % 2)


def nan_loss(logp, mb, **_):
    """A loss that has gone NaN (an overflowing ratio, a bad advantage): the trainer must not step on it."""
    return logp * float("nan"), {}


def reward_uniform_on_even_rows(sample):
    """Every sample of an even data row scores 1 (a group drop_uniform_reward drops); odd rows score by sample."""
    row = int(sample.group_id.rsplit("-p", 1)[1])
    return 1.0 if row % 2 == 0 else float(sample.index % 2)


def length_reward(sample):
    """Longer answers score more: a reward that varies from the first step, whatever the tiny model has learned."""
    return len(sample.response_ids) / 6.0


async def agent_with_a_wrong_model(base_url, api_key, task):
    """Every model call fails (a model name the gateway does not serve), so the run must stop, not train on
    nothing."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    try:
        await client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": task["prompt"]}], max_tokens=4
        )
    finally:
        await client.close()


async def agent_recovering_from_an_error(base_url, api_key, task):
    """Its first call is refused (over the context) and swallowed, as agent loops often do; the second works."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    messages = [{"role": "user", "content": task["prompt"]}]
    try:
        try:
            await client.chat.completions.create(model="vime", messages=messages, max_tokens=100_000)
        except openai.BadRequestError:
            pass
        r = await client.chat.completions.create(model="vime", messages=messages, max_tokens=4)
        return r.choices[0].message.content
    finally:
        await client.close()


async def agent_raising_after_a_call(base_url, api_key, task):
    """Makes one model call, then fails in its own code: the episode is trained on with reward 0, and counted."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    try:
        await client.chat.completions.create(
            model="vime", messages=[{"role": "user", "content": task["prompt"]}], max_tokens=4
        )
    finally:
        await client.close()
    raise ValueError("the agent's tool crashed")


async def agent_at_its_own_temperature(base_url, api_key, task):
    """Samples at 0.5 while the recipe's rollout.temperature is 1.0: trained tokens scored at the wrong T."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    try:
        r = await client.chat.completions.create(
            model="vime", messages=[{"role": "user", "content": task["prompt"]}], max_tokens=4, temperature=0.5
        )
        return r.choices[0].message.content
    finally:
        await client.close()
