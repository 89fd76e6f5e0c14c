"""Engine supervision for rollouts: a request whose engine died is not lost. The pool finds the dead server,
restarts it, brings it back to the weight version the others hold, and sends the request again with the same
sampling seed, so the step completes with every prompt's group exactly once.

Rollout functions and the gateway see a `SupervisedPool` as the plain `EnginePool` they expect; only a failure
for which `EngineGroup.dead()` names a server is handled here, every other error reaches the caller unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from vime.protocols import Engine, EngineGroup
from vime.types import Completion, SamplingParams

log = logging.getLogger(__name__)


class SupervisedEngine:
    """An engine handle that survives its server: each attempt asks the pool for the engine again (a restart
    replaces it), either by request key or by position."""

    def __init__(self, pool: SupervisedPool, key: str | None = None, index: int | None = None):
        self.pool, self.key, self.index = pool, key, index

    def current(self) -> Engine:
        group = self.pool.group
        return group.engines[self.index] if self.index is not None else group.pick(self.key)

    @property
    def base_url(self) -> str:
        return self.current().base_url

    async def healthy(self) -> bool:
        return await self.current().healthy()

    async def generate(
        self, prompts: list[list[int]], params: SamplingParams, session: str | None = None
    ) -> list[list[Completion]]:
        while True:
            epoch = self.pool.epoch
            try:
                return await self.current().generate(prompts, params, session)
            except Exception as e:
                if not await self.pool.recover(epoch, e):
                    raise
                self.pool.counts["reissued_requests"] += 1


class SupervisedPool:
    """`resync` brings restarted servers to the current weights (the trainer's push); `max_restarts` bounds how
    many engine deaths a run survives before it fails with the first cause; a failed request waits up to
    `grace_s` for its server to show as dead before the error is taken as the request's own."""

    def __init__(self, group: EngineGroup, resync: Callable[[], None], max_restarts: int = 8, grace_s: float = 5.0):
        self.group, self.resync, self.max_restarts, self.grace_s = group, resync, max_restarts, grace_s
        self.epoch = 0  # bumped by every recovery: a request that failed before it simply retries
        self.counts = {"engine_restarts": 0, "reissued_requests": 0}
        self.total_restarts = 0
        self._lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None  # each rollout step has its loop

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

    async def recover(self, epoch: int, error: BaseException) -> bool:
        """True: the request may be sent again (a dead server was restarted and re-synced, now or by another
        request since it failed). False: no server died, so the error is the request's own."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock[0] is not loop:
            self._lock = (loop, asyncio.Lock())
        async with self._lock[1]:
            if self.epoch != epoch:
                return True
            dead = await asyncio.to_thread(self._dead_within, self.grace_s)
            if not dead:
                return False
            if self.total_restarts + len(dead) > self.max_restarts:
                raise RuntimeError(
                    f"engine servers {dead} died and {self.total_restarts} restarts were already spent "
                    f"(limit {self.max_restarts}); the first failure follows"
                ) from error
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
        self.resync()
