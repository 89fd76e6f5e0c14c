"""Starting N servers of one engine, locally or each in a Ray actor on its placement bundle, and picking the
server for a request: what every engine group does the same way, whatever the engine."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from vime.registry import load_object

log = logging.getLogger(__name__)


class Loaded(Protocol):
    inflight: int


class External:
    """A server vime did not start (attached by URL): never stopped by vime."""

    def __init__(self, url: str, version: Any = None):
        self.base_url, self.version = url.rstrip("/"), version
        self.port = int(self.base_url.rsplit(":", 1)[1])

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        pass


def launch(
    server_cls: str,
    model_path: str,
    kwargs: list[dict[str, Any]],
    placement: tuple[Any, list[int]] | None,
    indices: list[int],
    *,
    cpus: float,
    gpus: float,
) -> list[Any]:
    """Start one server per entry of `kwargs` (`server_cls`: a `ServerProcess` import path) and wait until all
    are healthy; any failure stops them all. With `placement` = (Ray placement group, bundle per server index)
    each runs in an actor on its bundle."""
    if placement is None:
        cls = load_object(server_cls, what="engine server class")
        servers = [cls(model_path, **kw) for kw in kwargs]
        try:
            for s in servers:
                s.start()
            for s in servers:
                s.wait_healthy()
        except BaseException:
            for s in servers:
                s.stop()
            raise
        return servers
    import ray

    from engines.common.actor import EngineActor, RemoteServer
    from vime.placement import bundle_strategy

    pg, bundles = placement
    actors = [
        ray.remote(EngineActor)
        .options(
            num_cpus=cpus,
            num_gpus=gpus,
            scheduling_strategy=bundle_strategy(pg, bundles[i]),
            # threaded: stop() must be able to kill a server whose start() is still waiting for health
            # (a stop queued behind start would time out, and the actor's kill would orphan the workers)
            max_concurrency=4,
        )
        .remote(server_cls, model_path, kw)
        for i, kw in zip(indices, kwargs)
    ]
    try:
        started = ray.get([a.start.remote() for a in actors])
    except BaseException:  # a failed start, or the driver interrupted (SIGTERM, Ctrl-C) while servers start
        # stop first: killing the actor kills its server by PR_SET_PDEATHSIG, but not the server's own children
        # (vLLM's EngineCore would be left running, re-parented to init)
        try:
            ray.get([a.stop.remote() for a in actors], timeout=60)
        except Exception:
            log.exception("engine actors did not stop their servers cleanly; killing them")
        for a in actors:
            ray.kill(a)
        raise
    return [RemoteServer(a, *info) for a, info in zip(actors, started)]


def launch_retrying(start: Callable[[], list[Any]], retries: int, what: str) -> list[Any]:
    """`start()`, again when a server was killed by a signal while starting (the OOM killer, an operator, a
    chaos test): that is the machine's fault, not the recipe's. A server that exits by itself (a bad flag, a bad
    model) fails at once."""
    for attempt in range(retries + 1):
        try:
            return start()
        except Exception as e:
            if attempt == retries or "exited with code -" not in str(e):
                raise
            log.warning(
                "a %s server was killed while starting; starting again (%d of %d, engine.start_retries): %s",
                what,
                attempt + 1,
                retries,
                str(e).splitlines()[0],
            )
    raise AssertionError("unreachable")


def pick(engines: Sequence[Loaded], key: str | None, turn: int) -> Any:
    """A session key always maps to the same engine (its prefix cache stays warm); otherwise the least loaded,
    ties broken round-robin by `turn`."""
    if key is not None:
        h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
        return engines[h % len(engines)]
    n = len(engines)
    return engines[min(range(n), key=lambda i: (engines[i].inflight, (i - turn) % n))]
