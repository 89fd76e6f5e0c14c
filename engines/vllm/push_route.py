"""`POST /vime/push`: one step of a weight push in one HTTP round trip, served inside vLLM's API server process
(`--middleware engines.vllm.push_route.PushRoute`, which vime adds to every server it starts).

A push is latency-bound: each control call went trainer → API server over HTTP, then API server → engine core.
Here the trainer makes one HTTP call per staging round (one per push when the model fits the buffer), and the
API server makes the engine-core calls back to back on vLLM's own engine client: pause (level-0 sleep) on the
first round; `vime_update` on every round; on the last, the weight version (vLLM >= 0.27), the prefix-cache reset,
the check of every pushed tensor's sums against the sums the sender sends after the call (`fingerprint.check`),
the delta base's commit, and the resume — which happens only if every step before it succeeded. An engine whose check
fails stays paused, as it did when the sender checked. The answer carries each phase's seconds: the timeline of
a push as the engine saw it.

The sender's sums of the last round need not hold its call up: the round names them (`expect_id`) and they
follow in a second request (`POST /vime/push/expect`) that the sender makes once it has summed what the engines
are already pausing for and loading; the round waits for them (at most `expect_timeout_s`) just before the check.
On a GPU that hides the sender's read of the model behind the engines' pause and load.

A server that runs several data-parallel engines (`--data-parallel-size`) answers vLLM's `collective_rpc` with
the first engine's workers only; every call here goes to the workers of all of them (`every_worker`), so each
one's load is timed and each one's weights are checked. `POST /vime/workers` does the same for the sender's other
worker calls (`vime_*` methods only): its checks again, its delta base's version, the server's layout.

It is a pure ASGI middleware (like the guard, which vime adds after it, so the guard runs first and this route
needs the run's secret); any other path passes through untouched.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PATH = "/vime/push"
EXPECT_PATH = "/vime/push/expect"
WORKERS_PATH = "/vime/workers"
NEEDS = (  # what a sender says when a server answers these paths (or `vime_update`) with 404
    "vime's weight channel needs its worker extension and push route on every vLLM server "
    "(--worker-extension-cls engines.vllm.worker_ext.VimeWorkerExtension --middleware "
    "engines.vllm.push_route.PushRoute; vime-started servers have both)"
)
Scope = dict[str, Any]
Sums = dict[str, tuple[list[Any], int, str]]  # name -> (sums, numel, dtype) of what the sender sent


class PushStep(BaseModel):
    """What the sender asks of one engine in one round (crosses the HTTP boundary, so it is checked here)."""

    model_config = ConfigDict(extra="forbid")

    update: dict[str, Any]  # `VimeWorkerExtension.vime_update`'s kwargs: update_info, start, finish, sums, ...
    pause: Literal["keep", "abort", "wait"] | None = None  # first round: pause generation first, in this mode
    last: bool = False  # the push's last round: version, reset, check, commit, resume follow the update
    version: str | None = None  # vLLM >= 0.27 keeps the weight version in the engine
    expect: Sums | None = None  # the sender's sums, sent along
    expect_id: str | None = None  # or: they follow in a `/vime/push/expect` request carrying this id
    expect_timeout_s: float = 300.0  # how long the round waits for them
    commit: str | None = None  # delta pushes: the version the workers' kept tensors become the base of
    label: str = ""  # how the sender names this engine in its messages


class PushExpect(BaseModel):
    """The sender's sums of a push whose last round named `expect_id` (`POST /vime/push/expect`)."""

    model_config = ConfigDict(extra="forbid")

    expect_id: str
    expect: Sums


class WorkersCall(BaseModel):
    """A worker-extension method to run on every worker of every engine of the server (`POST /vime/workers`)."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(pattern=r"^vime_\w+$")  # vime's own methods (`worker_ext.VimeWorkerExtension`), no others
    kwargs: dict[str, Any] = Field(default_factory=dict)


async def every_worker(engine: Any, method: str, kwargs: dict[str, Any]) -> list[Any]:
    """`method` on every worker of every data-parallel engine this server runs, their answers in engine order.
    vLLM's `collective_rpc` runs it on all of them too but returns the first engine's answers alone."""
    core: Any = getattr(engine, "engine_core", None)
    engines = getattr(core, "core_engines", None) or []
    if len(engines) <= 1:
        return await engine.collective_rpc(method, kwargs=kwargs)
    args = ("collective_rpc", method, None, (), kwargs)
    per_engine = await asyncio.gather(*(core._call_utility_async(*args, engine=e) for e in engines))
    return [w for workers in per_engine for w in workers]


# expect_id -> the sums, whichever of the round and the sums comes first makes the future; a few at most (a round
# that failed before it waited leaves its entry: the oldest go first)
PENDING: dict[str, asyncio.Future[Sums]] = {}


def pending(expect_id: str) -> asyncio.Future[Sums]:
    if expect_id not in PENDING:
        while len(PENDING) >= 8:
            PENDING.pop(next(iter(PENDING)))
        PENDING[expect_id] = asyncio.get_running_loop().create_future()
    return PENDING[expect_id]


async def expected(step: PushStep) -> Sums | str | None:
    """The sums the round is checked against (None: none asked), or why they did not come."""
    if step.expect_id is None:
        return step.expect
    try:
        return await asyncio.wait_for(asyncio.shield(pending(step.expect_id)), step.expect_timeout_s)
    except TimeoutError:
        return (
            f"{step.label}: the sender's sums of this push ({EXPECT_PATH}, id {step.expect_id}) did not come within "
            f"{step.expect_timeout_s:g} s (half of weights.timeout_s); the engine stays paused"
        )
    finally:
        PENDING.pop(step.expect_id, None)


async def run_step(engine: Any, step: PushStep) -> dict[str, Any]:
    phases: dict[str, float] = {}

    async def timed(name: str, coro: Any) -> Any:
        t = time.perf_counter()
        out = await coro
        phases[name] = time.perf_counter() - t
        return out

    if step.pause:
        await timed("pause", engine.sleep(0, step.pause))
    results = await timed("update", every_worker(engine, "vime_update", step.update))
    out: dict[str, Any] = {"results": results, "phases": phases, "problems": [], "resumed": False}
    if not step.last:
        return out
    if step.version is not None:
        await timed("version", engine.update_weight_version(step.version))
        out["weight_version"] = await engine.get_weight_version()
    if not await timed("reset_prefix_cache", engine.reset_prefix_cache(reset_running_requests=True)):
        out["problems"].append(f"{step.label}: prefix cache not reset: new requests could reuse KV of the old weights")
        return out
    if step.expect is not None or step.expect_id is not None:
        from engines.vllm.fingerprint import check

        expect = await timed("wait_sums", expected(step))
        if isinstance(expect, str):
            out["problems"].append(expect)
            return out
        t = time.perf_counter()
        out["problems"] = check(expect or {}, results, step.label)
        phases["check"] = time.perf_counter() - t
        if out["problems"]:
            return out
    if step.commit is not None:
        await timed("commit", every_worker(engine, "vime_delta_commit", {"version": step.commit}))
    await timed("resume", engine.wake_up(["scheduling"]))
    out["resumed"] = True
    return out


async def take_expect(engine: Any, body: PushExpect) -> dict[str, Any]:
    fut = pending(body.expect_id)
    if not fut.done():
        fut.set_result(body.expect)
    return {"expect_id": body.expect_id}


async def call_workers(engine: Any, call: WorkersCall) -> dict[str, Any]:
    return {"results": await every_worker(engine, call.method, call.kwargs)}


# path -> the request body's model and what answers it
ROUTES: dict[str, tuple[type[BaseModel], Any]] = {
    PATH: (PushStep, run_step),
    EXPECT_PATH: (PushExpect, take_expect),
    WORKERS_PATH: (WorkersCall, call_workers),
}


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
        route = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        if scope.get("method") != "POST":
            await respond(send, 405, {"error": f"{scope['path']} takes POST"})
            return
        model, answer = route
        try:
            body = model.model_validate_json(await read_body(receive))
        except ValidationError as e:
            await respond(send, 422, {"error": f"{scope['path']}: invalid request body: {e}"})
            return
        try:
            out = await answer(scope["app"].state.engine_client, body)
        except Exception as e:  # noqa: BLE001 - the sender raises WeightPushError with it; an engine stays paused
            await respond(send, 500, {"error": f"{type(e).__name__}: {e}"})
            return
        await respond(send, 200, out)
