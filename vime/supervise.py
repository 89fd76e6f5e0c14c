"""Engine supervision for rollouts: a request whose engine died is not lost. The pool finds the dead server,
restarts it, brings it back to the weight version the others hold, and sends the request again with the same
sampling seed, so the step completes with every prompt's group exactly once.

A server can also hang (alive, but answering nothing): while requests are in flight a watchdog probes every engine
(`Engine.healthy`, with a timeout) and restarts one that fails `probe_failures` probes in a row, which turns its
stuck requests into failed ones that are re-issued like a dead server's. While a server restarts, new requests go to
the others (when there are others) and come back to it once it is up.

Rollout functions and the gateway see a `SupervisedPool` as the plain `EnginePool` they expect; only a failure
for which `EngineGroup.dead()` names a server is handled here, every other error reaches the caller unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from vime.protocols import Engine, EngineGroup
from vime.types import Completion, SamplingParams

log = logging.getLogger(__name__)


class ProbeConfig(BaseModel):
    """How a hung server is told from a busy one: `failures` health probes in a row, `interval_s` apart, each
    unanswered within `timeout_s`."""

    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(default=10.0, ge=0, description="seconds between probes while requests run; 0: off")
    timeout_s: float = Field(default=10.0, gt=0, description="a probe unanswered this long failed")
    failures: int = Field(default=3, ge=1, description="failed probes in a row that mark a server hung")


class SupervisedEngine:
    """An engine handle that survives its server: each attempt asks the pool for the engine again (a restart
    replaces it), either by request key or by position."""

    def __init__(self, pool: SupervisedPool, key: str | None = None, index: int | None = None):
        self.pool, self.key, self.index = pool, key, index

    def current(self) -> Engine:
        group = self.pool.group
        engine = group.engines[self.index] if self.index is not None else group.pick(self.key)
        return self.pool.route_around(engine)

    @property
    def base_url(self) -> str:
        return self.current().base_url

    async def healthy(self) -> bool:
        ok = await self.current().healthy()
        if not ok:  # e.g. the gateway skipping it: if its server died, have it restarted meanwhile
            self.pool.notice()
        return ok

    async def generate(
        self, prompts: list[list[int]], params: SamplingParams, session: str | None = None
    ) -> list[list[Completion]]:
        self.pool.inflight += 1
        self.pool.watch()
        try:
            while True:
                epoch = self.pool.epoch
                try:
                    return await self.current().generate(prompts, params, session)
                except Exception as e:
                    if not await self.pool.recover(epoch, e):
                        raise
                    self.pool.counts["reissued_requests"] += 1
        finally:
            self.pool.inflight -= 1

    async def stream(
        self, prompt: list[int], params: SamplingParams, session: str | None = None
    ) -> AsyncIterator[Completion]:
        """Re-issued like `generate` while nothing has reached the caller; once tokens have gone out, a failure
        is the caller's (a client cannot take back what it was streamed)."""
        self.pool.inflight += 1
        self.pool.watch()
        try:
            while True:
                epoch, sent = self.pool.epoch, False
                try:
                    async for c in self.current().stream(prompt, params, session):
                        sent = True
                        yield c
                    return
                except Exception as e:
                    if sent or not await self.pool.recover(epoch, e):
                        raise
                    self.pool.counts["reissued_requests"] += 1
        finally:
            self.pool.inflight -= 1


class SupervisedPool:
    """`resync` brings restarted servers to the current weights (the trainer's push); `max_restarts` bounds how
    many engine deaths a run survives before it fails with the first cause; a failed request waits up to
    `grace_s` for its server to show as dead before the error is taken as the request's own."""

    def __init__(
        self,
        group: EngineGroup,
        resync: Callable[[], None],
        max_restarts: int = 8,
        grace_s: float = 5.0,
        probe: ProbeConfig | None = None,
    ):
        self.group, self.resync, self.max_restarts, self.grace_s = group, resync, max_restarts, grace_s
        self.probe = probe or ProbeConfig()
        self.epoch = 0  # bumped by every recovery: a request that failed before it simply retries
        self.counts = {"engine_restarts": 0, "reissued_requests": 0, "hung_engines": 0}
        self.total_restarts = 0
        self.inflight = 0
        self.down: set[int] = set()  # servers being restarted: new requests go elsewhere meanwhile
        self._lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None  # each rollout step has its loop
        self._watchdog: asyncio.Task[None] | None = None
        self._healing: asyncio.Task[None] | None = None
        self.closed = False  # the run is stopping: a server that goes away is not restarted

    def close(self) -> None:
        self.closed = True

    @property
    def engines(self) -> Sequence[Engine]:
        return [SupervisedEngine(self, index=i) for i in range(len(self.group.engines))]

    def pick(self, key: str | None = None) -> Engine:
        return SupervisedEngine(self, key=key) if key is not None else SupervisedEngine(self, index=self._least())

    def _least(self) -> int:
        """Position of the engine the group would pick now (least loaded), kept for every retry's re-pick."""
        chosen = self.group.pick()
        return next(i for i, e in enumerate(self.group.engines) if e is chosen)

    def take_counts(self) -> dict[str, float]:
        """This step's restarts and re-issued requests (then zeroed), for the step's metrics."""
        out = {f"faults/{k}": float(v) for k, v in self.counts.items()}
        self.counts = dict.fromkeys(self.counts, 0)
        return out

    def route_around(self, engine: Engine) -> Engine:
        """The engine itself, unless its server is being restarted and another one is up."""
        engines = list(self.group.engines)
        if not self.down or len(engines) != len(self.group.urls()):  # behind a router: the router routes
            return engine
        i = next((j for j, e in enumerate(engines) if e is engine), None)
        up = [e for j, e in enumerate(engines) if j not in self.down]
        return up[0] if i in self.down and up else engine

    def lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock[0] is not loop:
            self._lock = (loop, asyncio.Lock())
        return self._lock[1]

    def watch(self) -> None:
        """Start the hang watchdog on this event loop, once (it ends when no request is in flight)."""
        if self.probe.interval_s and (self._watchdog is None or self._watchdog.done()):
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        misses = [0] * len(self.group.engines)
        while self.inflight > 0:
            await asyncio.sleep(self.probe.interval_s)
            epoch = self.epoch
            oks = await asyncio.gather(*(self._probe(e) for e in self.group.engines))
            if self.epoch != epoch or self.down:  # a recovery ran meanwhile: its servers are new, start over
                misses = [0] * len(misses)
                continue
            misses = [0 if ok else m + 1 for ok, m in zip(oks, misses)]
            hung = [i for i, m in enumerate(misses) if m >= self.probe.failures]
            if hung and self.inflight > 0:
                await self._restart_hung(hung, epoch)
                misses = [0] * len(misses)

    def notice(self) -> None:
        """An engine failed a health check outside any request (the gateway routing around it): restart its
        server in the background if it died, so it comes back without waiting for a request to fail on it."""
        if self._healing is None or self._healing.done():
            self._healing = asyncio.get_running_loop().create_task(self._heal(self.epoch))

    async def _heal(self, epoch: int) -> None:
        try:
            # a server that just stopped answering may not have exited yet (seen under load: the only heal ran before
            # the killed process was gone, and nothing asked again): look a few times before deciding it is alive
            for _ in range(20):
                if self.epoch != epoch or len(await asyncio.to_thread(self.group.dead)) > 0:
                    break
                await asyncio.sleep(0.1)
            async with self.lock():
                dead = [] if self.epoch != epoch else await asyncio.to_thread(self.group.dead)
                if not dead:
                    return
                self._check_budget(dead, RuntimeError(f"engine servers {dead} died"))
                log.warning("engine servers %s died; restarting them", dead)
                await asyncio.to_thread(self._restart, dead)
                self.epoch += 1
        except Exception:  # nobody awaits this task: say it here; requests keep going to the other engines
            log.exception("restarting dead engine servers failed")

    async def _probe(self, engine: Engine) -> bool:
        try:
            return await asyncio.wait_for(engine.healthy(), self.probe.timeout_s)
        except Exception:  # noqa: BLE001 - a probe that times out or errors is a failed probe
            return False

    async def _restart_hung(self, hung: list[int], epoch: int) -> None:
        """Kill and restart servers that stopped answering; their stuck requests fail and are re-issued."""
        servers = hung if len(self.group.engines) == len(self.group.urls()) else list(range(len(self.group.urls())))
        async with self.lock():
            if self.epoch != epoch:  # a failed request's recovery restarted them while we waited for the lock
                return
            log.warning(
                "engine servers %s answered no health probe for %d tries (%.0f s apart); restarting them",
                servers,
                self.probe.failures,
                self.probe.interval_s,
            )
            self.counts["hung_engines"] += len(servers)
            self._check_budget(servers, RuntimeError(f"engine servers {servers} hung"))
            await asyncio.to_thread(self._restart, servers)
            self.epoch += 1

    def _check_budget(self, servers: list[int], error: BaseException) -> None:
        if self.closed:
            raise RuntimeError(f"engine servers {servers} went away while the run was stopping") from error
        if self.total_restarts + len(servers) > self.max_restarts:
            raise RuntimeError(
                f"engine servers {servers} failed and {self.total_restarts} restarts were already spent "
                f"(loop.max_engine_restarts={self.max_restarts}); the first failure follows"
            ) from error

    async def recover(self, epoch: int, error: BaseException) -> bool:
        """True: the request may be sent again (a dead server was restarted and re-synced, now or by another
        request since it failed). False: no server died, so the error is the request's own."""
        async with self.lock():
            if self.epoch != epoch:
                return True
            dead = await asyncio.to_thread(self._dead_within, self.grace_s)
            if not dead:
                return False
            self._check_budget(dead, error)
            log.warning("engine servers %s died (%s); restarting and re-syncing weights", dead, error)
            await asyncio.to_thread(self._restart, dead)
            self.epoch += 1
            return True

    def _dead_within(self, grace_s: float) -> list[int]:
        """Dead servers, waiting up to `grace_s` for one to show: a killed server's sockets close while it is still
        exiting, so the failed request can arrive before the process is gone."""
        deadline = time.monotonic() + grace_s
        while not (dead := self.group.dead()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return dead

    def _restart(self, dead: list[int]) -> None:
        """Restart each dead server; a restart that fails (the new server died while starting) is one more fault,
        tried again within the same bound."""
        self.down |= set(dead)
        try:
            self._restart_each(dead)
        finally:
            self.down -= set(dead)
        self.resync()

    def _restart_each(self, dead: list[int]) -> None:
        for i in dead:
            while True:
                self.counts["engine_restarts"] += 1
                self.total_restarts += 1
                try:
                    self.group.restart(i)
                    break
                except Exception:
                    if self.total_restarts >= self.max_restarts:
                        raise
                    log.exception("restarting engine server %d failed; trying again", i)
