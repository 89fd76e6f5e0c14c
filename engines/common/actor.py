"""An engine server owned by a Ray actor, so engines are placed by Ray like trainer ranks (CPU or GPU bundles;
Ray's CUDA_VISIBLE_DEVICES reaches the server). The server is the actor's child with PR_SET_PDEATHSIG: when
Ray kills the actor, the server goes too. Any engine's `ServerProcess` class, named by import path."""

from __future__ import annotations

import logging
from typing import Any

from vime.registry import load_object

log = logging.getLogger(__name__)


class EngineActor:
    def __init__(self, server_cls: str, model_path: str, kwargs: dict[str, Any]):
        self.server = load_object(server_cls, what="engine server class")(model_path, **kwargs)

    def start(self) -> tuple[str, int, Any]:
        import ray

        self.server.start()
        self.server.wait_healthy()
        return (
            self.server.host if self.server.host != "0.0.0.0" else ray.util.get_node_ip_address(),
            self.server.port,
            getattr(self.server, "version", None),
        )

    def alive(self) -> bool:
        return self.server.alive()

    def stop(self) -> None:
        self.server.stop()


class RemoteServer:
    """The driver's view of a server running in an EngineActor (same surface as the server itself)."""

    def __init__(self, actor: Any, host: str, port: int, version: Any):
        self.actor, self.host, self.port, self.version = actor, host, port, version

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def alive(self) -> bool:
        import ray

        try:
            return bool(ray.get(self.actor.alive.remote(), timeout=10))
        except Exception:  # noqa: BLE001 - a dead actor is a dead server
            return False

    def stop(self) -> None:
        import ray

        if not ray.is_initialized():  # Ray already gone: it took the actor, and the server with it
            return
        try:
            ray.get(self.actor.stop.remote(), timeout=60)
        except Exception:  # the actor died or hung: kill it below either way, but say so
            log.exception("engine actor did not stop cleanly; killing it")
        ray.kill(self.actor)
