"""`POST /vime/push`: one step of a weight push in one HTTP round trip, served inside vLLM's API server process
(`--middleware engines.vllm.push_route.PushRoute`, which vime adds to every server it starts).

A push is latency-bound: each control call went trainer → API server over HTTP, then API server → engine core.
Here the trainer makes one HTTP call per staging round (one per push when the model fits the buffer), and the
API server makes the engine-core calls back to back on vLLM's own engine client: pause (level-0 sleep) on the
first round; `vime_update` on every round; on the last, the weight version (vLLM >= 0.27), the prefix-cache reset,
the check of every pushed tensor's sums against the sums the sender sent along (`fingerprint.check`), the delta
base's commit, and the resume — which happens only if every step before it succeeded. An engine whose check
fails stays paused, as it did when the sender checked. The answer carries each phase's seconds: the timeline of
a push as the engine saw it.

It is a pure ASGI middleware (like the guard, which vime adds after it, so the guard runs first and this route
needs the run's secret); any other path passes through untouched.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

PATH = "/vime/push"
Scope = dict[str, Any]


class PushStep(BaseModel):
    """What the sender asks of one engine in one round (crosses the HTTP boundary, so it is checked here)."""

    model_config = ConfigDict(extra="forbid")

    update: dict[str, Any]  # `VimeWorkerExtension.vime_update`'s kwargs: update_info, start, finish, sums, ...
    pause: Literal["keep", "abort", "wait"] | None = None  # first round: pause generation first, in this mode
    last: bool = False  # the push's last round: version, reset, check, commit, resume follow the update
    version: str | None = None  # vLLM >= 0.27 keeps the weight version in the engine
    expect: dict[str, tuple[list[Any], int, str]] | None = None  # name -> (sums, numel, dtype) the sender sent
    commit: str | None = None  # delta pushes: the version the workers' kept tensors become the base of
    label: str = ""  # how the sender names this engine in its messages


async def run_step(engine: Any, step: PushStep) -> dict[str, Any]:
    phases: dict[str, float] = {}

    async def timed(name: str, coro: Any) -> Any:
        t = time.perf_counter()
        out = await coro
        phases[name] = time.perf_counter() - t
        return out

    if step.pause:
        await timed("pause", engine.sleep(0, step.pause))
    results = await timed("update", engine.collective_rpc("vime_update", kwargs=step.update))
    out: dict[str, Any] = {"results": results, "phases": phases, "problems": [], "resumed": False}
    if not step.last:
        return out
    if step.version is not None:
        await timed("version", engine.update_weight_version(step.version))
        out["weight_version"] = await engine.get_weight_version()
    if not await timed("reset_prefix_cache", engine.reset_prefix_cache(reset_running_requests=True)):
        out["problems"].append(f"{step.label}: prefix cache not reset: new requests could reuse KV of the old weights")
        return out
    if step.expect is not None:
        from engines.vllm.fingerprint import check

        t = time.perf_counter()
        out["problems"] = check(step.expect, results, step.label)
        phases["check"] = time.perf_counter() - t
        if out["problems"]:
            return out
    if step.commit is not None:
        await timed("commit", engine.collective_rpc("vime_delta_commit", kwargs={"version": step.commit}))
    await timed("resume", engine.wake_up(["scheduling"]))
    out["resumed"] = True
    return out


async def read_body(receive: Any) -> bytes:
    chunks, more = [], True
    while more:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        more = msg.get("more_body", False)
    return b"".join(chunks)


async def respond(send: Any, status: int, answer: Any) -> None:
    body = json.dumps(answer).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class PushRoute:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        if scope.get("method") != "POST":
            await respond(send, 405, {"error": f"{PATH} takes POST"})
            return
        try:
            step = PushStep.model_validate_json(await read_body(receive))
        except ValidationError as e:
            await respond(send, 422, {"error": f"{PATH}: invalid request body: {e}"})
            return
        try:
            answer = await run_step(scope["app"].state.engine_client, step)
        except Exception as e:  # noqa: BLE001 - the sender raises WeightPushError with it; the engine stays paused
            await respond(send, 500, {"error": f"{type(e).__name__}: {e}"})
            return
        await respond(send, 200, answer)
