"""N vLLM servers as one engine group: started together, stopped together, requests routed by session key."""
from __future__ import annotations

import atexit
import hashlib
import os
import time
from pathlib import Path
from typing import Any

from engines.vllm.client import VLLMClient
from engines.vllm.server import VLLMServer
from vime.engine import EngineConfig
from vime.types import Completion, SamplingParams


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


class ExternalServer:
    """A server vime did not start (attached by URL): never stopped by vime."""

    def __init__(self, url: str, version: tuple[int, int, int]):
        self.base_url, self.version = url.rstrip("/"), version
        self.port = int(self.base_url.rsplit(":", 1)[1])

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        pass


class VLLMEngine:
    """One server + its client: the `vime.protocols.Engine` for vLLM."""

    HEALTH_TTL_S = 2.0  # a health probe per request would double the HTTP traffic

    def __init__(self, server: Any, request_timeout_s: float):
        self.server = server
        self.client = VLLMClient(server.base_url, timeout_s=request_timeout_s, version=server.version)
        self.inflight = 0
        self._health = (0.0, False)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    async def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        self.inflight += len(prompts)
        try:
            return await self.client.generate(prompts, params)
        finally:
            self.inflight -= len(prompts)

    async def pause(self, mode: str = "keep") -> None:
        await self.client.pause(mode)

    async def resume(self) -> None:
        await self.client.resume()

    async def weight_version(self) -> str:
        return await self.client.weight_version()

    async def healthy(self) -> bool:
        checked, ok = self._health
        if time.monotonic() - checked > self.HEALTH_TTL_S:
            ok = self.server.alive() and await self.client.healthy()
            self._health = (time.monotonic(), ok)
        return ok


class VLLMEngineGroup:
    def __init__(self, cfg: EngineConfig, *, model_path: str, log_dir: str, weights_backend: str | None = None,
                 placement: tuple[Any, list[int]] | None = None):
        self.cfg = cfg
        self.weights_backend = weights_backend
        self.placement = placement  # (Ray placement group, bundle index per engine): servers run in Ray actors
        self.model_path = model_path
        self.log_dir = Path(log_dir)
        self.engines: list[VLLMEngine] = []
        self._rr = 0

    def _server_env(self, i: int) -> dict[str, str]:
        env = dict(self.cfg.env)
        if on_cpu() and self.cfg.num_engines > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            # Without explicit pinning every CPU server binds core 0 and they crawl.
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(i % (os.cpu_count() or 1))
        return env

    def _server_args(self) -> dict[str, Any]:
        args = dict(self.cfg.args)
        if self.weights_backend:
            # vime's own engines (gloo, disk) register into vLLM's factory when this module is imported
            args.setdefault("worker_extension_cls", "engines.vllm.worker_ext.VimeWorkerExtension")
            args.setdefault("weight_transfer_config", {"backend": self.weights_backend})
        return args

    def _server_kwargs(self, i: int, port: int | None) -> dict[str, Any]:
        return dict(host=self.cfg.host, port=port, args=self._server_args(), env=self._server_env(i),
                    log_path=self.log_dir / f"vllm_{i}.log", startup_timeout_s=self.cfg.startup_timeout_s)

    def _launch(self, indices: list[int], ports: list[int | None]) -> list[Any]:
        """Start servers (locally, or inside Ray actors on their bundles) and wait until all are healthy."""
        if self.placement is None:
            servers = [VLLMServer(self.model_path, **self._server_kwargs(i, p)) for i, p in zip(indices, ports)]
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

        from engines.vllm.actor import EngineActor, RemoteServer
        from vime.placement import bundle_strategy

        pg, bundles = self.placement
        actors = [ray.remote(EngineActor).options(
            num_cpus=self.cfg.cpus_per_engine, num_gpus=self.cfg.gpus_per_engine,
            scheduling_strategy=bundle_strategy(pg, bundles[i])).remote(self.model_path, self._server_kwargs(i, p))
            for i, p in zip(indices, ports)]
        try:
            started = ray.get([a.start.remote() for a in actors])
        except BaseException:
            for a in actors:
                ray.kill(a)
            raise
        return [RemoteServer(a, *info) for a, info in zip(actors, started)]

    @classmethod
    def attach(cls, urls: list[str], cfg: EngineConfig | None = None) -> "VLLMEngineGroup":
        """A group over servers that are already running (started elsewhere); stop() leaves them alone."""
        from engines.vllm.server import vllm_version

        group = cls(cfg or EngineConfig(), model_path="", log_dir=".")
        group.engines = [VLLMEngine(ExternalServer(u, vllm_version()), group.cfg.request_timeout_s) for u in urls]
        return group

    def start(self) -> "VLLMEngineGroup":
        atexit.register(self.stop)
        n = self.cfg.num_engines
        self.engines = [VLLMEngine(s, self.cfg.request_timeout_s) for s in self._launch(list(range(n)), [None] * n)]
        return self

    def stop(self) -> None:
        """Idempotent (it is also registered with atexit)."""
        engines, self.engines = self.engines, []
        for e in engines:
            e.server.stop()

    def restart(self, i: int) -> VLLMEngine:
        """Replace engine i by a fresh server on the same port, loaded from the model directory (its weight
        version is back to the initial one; the caller re-syncs weights)."""
        old = self.engines[i]
        old.server.stop()
        (server,) = self._launch([i], [old.server.port])
        self.engines[i] = VLLMEngine(server, self.cfg.request_timeout_s)
        return self.engines[i]

    def urls(self) -> list[str]:
        return [e.base_url for e in self.engines]

    def pick(self, key: str | None = None) -> VLLMEngine:
        """A session key always maps to the same engine (its prefix cache stays warm); otherwise least loaded."""
        if key is not None:
            h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
            return self.engines[h % len(self.engines)]
        self._rr += 1
        return min(self.engines, key=lambda e: (e.inflight, (self.engines.index(e) - self._rr) % len(self.engines)))

    def __enter__(self) -> "VLLMEngineGroup":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
