"""N vLLM servers as one engine group: started together, stopped together, requests routed by session key."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Self

import httpx

from engines.common.engine import ServedEngine
from engines.common.process import log_tail
from engines.common.servers import External, launch, launch_retrying, pick
from engines.vllm.client import EngineRequestError, VLLMClient
from engines.vllm.config import VLLMEngineConfig
from engines.vllm.router import VLLMRouter, pd_args
from vime.placement import free_port
from vime.secret import ENV as SECRET_ENV
from vime.secret import auth_headers, run_secret
from vime.types import Completion, SamplingParams

log = logging.getLogger(__name__)
ROUTER_LOST = "No available workers"  # vllm-router's answer when its table holds no usable server of a role


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


class VLLMEngine(ServedEngine):
    """One server (or the router) + its client: the `vime.protocols.Engine` for vLLM."""

    def __init__(
        self,
        server: Any,
        request_timeout_s: float,
        route: str = "generate",
        model: str = "",
        route_sources: list[str] | None = None,
        native_routes: bool = False,
        one_sample_per_request: bool = False,
    ):
        client = VLLMClient(
            server.base_url,
            timeout_s=request_timeout_s,
            version=server.version,
            route=route,
            model=model,
            route_sources=route_sources,
            native_routes=native_routes,
            explain=server.log_tail if isinstance(server, VLLMRouter) else None,
            one_sample_per_request=one_sample_per_request,
        )
        super().__init__(server, client)
        self._router_lock = asyncio.Lock()
        self._router_epoch = 0

    async def generate(
        self, prompts: list[list[int]], params: SamplingParams, session: str | None = None
    ) -> list[list[Completion]]:
        epoch = self._router_epoch
        try:
            return await super().generate(prompts, params, session)
        except EngineRequestError as e:
            if not await self._router_lost(e):
                raise
        await self._restart_router(epoch)
        return await super().generate(prompts, params, session)

    async def stream(
        self, prompt: list[int], params: SamplingParams, session: str | None = None
    ) -> AsyncIterator[Completion]:
        epoch, started = self._router_epoch, False
        try:
            async for c in super().stream(prompt, params, session):
                started = True
                yield c
            return
        except EngineRequestError as e:
            if started or not await self._router_lost(e):  # once tokens went out, a retry would repeat them
                raise
        await self._restart_router(epoch)
        async for c in super().stream(prompt, params, session):
            yield c

    async def _router_lost(self, e: EngineRequestError) -> bool:
        """Every server answers /health, yet the router has none of a role in its table: its fault, not theirs
        (a dead server is the group's to restart)."""
        return isinstance(self.server, VLLMRouter) and ROUTER_LOST in str(e) and await self._servers_healthy()

    async def _restart_router(self, epoch: int) -> None:
        """A fresh router re-reads the table; concurrent callers restart it once, the caller then asks again."""
        async with self._router_lock:
            if epoch == self._router_epoch:
                log.warning(
                    "vllm-router lost its healthy servers from its table; restarting it (%s ends with:\n%s)",
                    self.server.log_path,
                    log_tail(self.server.log_path, 8),
                )
                await asyncio.to_thread(self.server.restart)
                self._router_epoch += 1

    async def _servers_healthy(self) -> bool:
        async with httpx.AsyncClient(timeout=5.0) as http:
            try:
                return all(
                    [(await http.get(u + "/health")).status_code == 200 for u in self.client.route_sources or []]
                )
            except httpx.HTTPError:
                return False

    async def pause(self, mode: str = "keep") -> None:
        await self.client.pause(mode)

    async def resume(self) -> None:
        await self.client.resume()

    async def weight_version(self) -> str:
        return await self.client.weight_version()


class VLLMEngineGroup:
    """Owns every vLLM process of a run (and the router, if any).

    `servers` are the vLLM processes (weights are pushed to each of them); `engines` are where generation goes:
    one per server, or one over vllm-router when the topology is P/D (or `router.enabled`).
    """

    def __init__(
        self,
        cfg: VLLMEngineConfig,
        *,
        model_path: str,
        log_dir: str,
        weights_backend: str | None = None,
        placement: tuple[Any, list[int]] | None = None,
        sleep_mode: bool = False,
    ):
        self.cfg = cfg
        self.weights_backend = weights_backend
        self.sleep_mode = sleep_mode  # colocated on a GPU: servers release memory while the trainer runs
        self.placement = placement  # (Ray placement group, bundle index per server): servers run in Ray actors
        self.model_path = model_path
        self.log_dir = Path(log_dir)
        self.servers: list[Any] = []
        self.engines: list[VLLMEngine] = []
        self.router: VLLMRouter | None = None
        self._rr = 0

    @property
    def native_routes(self) -> bool:
        """R3 from vLLM's own output (the GPU line) rather than vime's capture hook."""
        return bool(self.cfg.args.get("enable_return_routed_experts"))

    def roles(self) -> list[str]:
        c = self.cfg
        if c.topology == "pd":
            return ["prefill"] * c.prefill.num_servers + ["decode"] * c.decode.num_servers
        return ["server"] * c.num_engines

    def _server_env(self, i: int) -> dict[str, str]:
        role = self.roles()[i]
        # the driver's secret, explicitly: a server in a Ray actor must not draw its own
        env = {SECRET_ENV: run_secret(), **self.cfg.env, **(getattr(self.cfg, role).env if role != "server" else {})}
        if on_cpu() and len(self.roles()) > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            # Without explicit pinning every CPU server binds core 0 and they crawl.
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(i % (os.cpu_count() or 1))
        if self.cfg.topology == "pd":
            env.setdefault("VLLM_NIXL_SIDE_CHANNEL_PORT", str(free_port()))  # one per server on a host
        if self.weights_backend == "ipc":  # CUDA IPC handles are pickles (the server listens on loopback)
            env.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        return env

    def _server_args(self, role: str) -> dict[str, Any]:
        args = dict(self.cfg.args)
        if role != "server":
            args.update(pd_args(role, on_cpu(), self.cfg.kv_connector))
            args.update(getattr(self.cfg, role).args)
        if self.weights_backend:
            from engines.vllm.weight_channel import VLLM_ENGINE_NAMES

            # vime's own engines (gloo, disk, vime_ipc) register into vLLM's factory when this module is imported
            args.setdefault("worker_extension_cls", "engines.vllm.worker_ext.VimeWorkerExtension")
            args.setdefault(
                "weight_transfer_config", {"backend": VLLM_ENGINE_NAMES.get(self.weights_backend, self.weights_backend)}
            )
        if self.sleep_mode:
            args.setdefault("enable_sleep_mode", True)
        return args

    def _server_kwargs(self, i: int, port: int | None) -> dict[str, Any]:
        role = self.roles()[i]
        name = f"vllm_{i}.log" if role == "server" else f"vllm_{role}_{i}.log"
        return {
            "host": self.cfg.host,
            "port": port,
            "args": self._server_args(role),
            "env": self._server_env(i),
            "log_path": self.log_dir / name,
            "startup_timeout_s": self.cfg.startup_timeout_s,
        }

    def _launch(self, indices: list[int], ports: list[int | None]) -> list[Any]:
        """Start servers (locally, or inside Ray actors on their bundles) and wait until all are healthy."""
        kwargs = [self._server_kwargs(i, p) for i, p in zip(indices, ports)]
        return launch(
            "engines.vllm.server:VLLMServer",
            self.model_path,
            kwargs,
            self.placement,
            indices,
            cpus=self.cfg.cpus_per_engine,
            gpus=self.cfg.gpus_per_engine,
        )

    def _launch_retrying(self, indices: list[int]) -> list[Any]:
        return launch_retrying(lambda: self._launch(indices, [None] * len(indices)), self.cfg.start_retries, "vLLM")

    @classmethod
    def attach(cls, urls: list[str], cfg: VLLMEngineConfig | None = None) -> VLLMEngineGroup:
        """A group over servers that are already running (started elsewhere); stop() leaves them alone."""
        from engines.vllm.server import vllm_version

        group = cls(cfg or VLLMEngineConfig(), model_path="", log_dir=".")
        group.servers = [External(u, vllm_version()) for u in urls]
        group.engines = [VLLMEngine(s, group.cfg.request_timeout_s) for s in group.servers]
        return group

    def start(self) -> Self:
        if self.servers:  # already running (e.g. `with group.start():`): never launch a second set
            return self
        atexit.register(self.stop)
        n = len(self.roles())
        self.servers = self._launch_retrying(list(range(n)))
        c = self.cfg
        if c.topology == "pd" or c.router.enabled:
            roles = self.roles()
            urls = [s.base_url for s in self.servers]
            pd = c.topology == "pd"
            try:
                self.router = VLLMRouter(
                    host=c.host,
                    prefill=[u for u, r in zip(urls, roles) if r == "prefill"],
                    decode=[u for u, r in zip(urls, roles) if r == "decode"],
                    workers=[] if pd else urls,
                    kv_connector=c.kv_connector,
                    policy="round_robin" if pd and c.router.policy == "consistent_hash" else c.router.policy,
                    log_path=self.log_dir / "router.log",
                    version=self.servers[0].version,
                    args=c.router.args,
                ).start()
            except BaseException:
                self.stop()
                raise
            self.engines = [
                VLLMEngine(
                    self.router,
                    c.request_timeout_s,
                    route="completions",
                    model=self.model_path,
                    route_sources=urls,
                    one_sample_per_request=pd,
                )
            ]
        else:
            self.engines = [VLLMEngine(s, c.request_timeout_s, native_routes=self.native_routes) for s in self.servers]
        return self

    def stop(self) -> None:
        """Idempotent (it is also registered with atexit)."""
        router, self.router = self.router, None
        if router is not None:
            router.stop()
        servers, self.servers, self.engines = self.servers, [], []
        for s in servers:
            s.stop()

    def restart(self, i: int) -> None:
        """Replace server i by a fresh one on the same port, loaded from the model directory (its weight version
        is back to the initial one; the caller re-syncs weights). A router keeps routing to the same URL."""
        old = self.servers[i]
        old.stop()
        (server,) = self._launch([i], [old.port])
        if i >= len(self.servers) or self.servers[i] is not old:  # stop() (or another restart) ran meanwhile
            server.stop()
            raise RuntimeError(f"engine server {i} was restarted while its group was being stopped")
        self.servers[i] = server
        if self.router is None:
            self.engines[i] = VLLMEngine(server, self.cfg.request_timeout_s, native_routes=self.native_routes)

    def dead(self) -> list[int]:
        """Servers whose process has exited (a router in front is restarted with the vime process, not here)."""
        return [i for i, s in enumerate(self.servers) if not s.alive()]

    def note_weight_version(self, version: str) -> None:
        """vLLM 0.26 and routers report no version: their clients tag new tokens with the one pushed last."""
        for e in self.engines:
            if e.client.local_version is not None:
                e.client.local_version = version

    def step_metrics(self) -> dict[str, float]:
        """Counters read from the servers' Prometheus /metrics, cumulative (the loop logs per-step deltas):
        prompt tokens by source (KV transferred from a prefill server, local cache hit, computed locally) and
        time to first token, summed over servers."""
        import httpx

        roles = self.roles()
        out = {
            "engines/prefill_servers": float(roles.count("prefill")),
            "engines/decode_servers": float(roles.count("decode")),
            "engines/servers": float(len(roles)),
        }
        sums: dict[str, float] = {}
        for s in self.servers:
            try:  # a busy server on two cores can take seconds to answer; a skipped one would skew the deltas
                text = httpx.get(s.base_url + "/metrics", timeout=30, headers=auth_headers()).text
            except httpx.HTTPError as e:
                log.warning("engine metrics of %s not read (this step's engine counters miss it): %s", s.base_url, e)
                out["engines/metrics_unread"] = out.get("engines/metrics_unread", 0.0) + 1.0
                continue
            for line in text.splitlines():
                if line.startswith("vllm:prompt_tokens_by_source_total{"):
                    key = "kv/" + line.split('source="')[1].split('"')[0]
                elif line.startswith(
                    ("vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count")
                ):
                    key = "ttft/" + line.split("{")[0].rsplit("_", 1)[1]
                else:
                    continue
                sums[key] = sums.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return {**out, **sums}

    def _post_all(self, path: str, params: Any = None) -> None:
        import httpx

        for s in self.servers:
            r = httpx.post(s.base_url + path, params=params, timeout=self.cfg.request_timeout_s, headers=auth_headers())
            if r.status_code >= 400:
                raise RuntimeError(f"{s.base_url}{path} -> {r.status_code}: {r.text[:300]}")

    def sleep(self, level: int = 1) -> None:
        """Free the servers' GPU memory (KV cache dropped; weights offloaded to host at level 1) so a colocated
        trainer can use it. Needs engines started with sleep_mode."""
        self._post_all("/sleep", {"level": level})

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore memory: tags=["weights"] first (then push), ["kv_cache"] last; None = everything."""
        self._post_all("/wake_up", [("tags", t) for t in tags or []])

    def urls(self) -> list[str]:
        """Every vLLM server (not the router): where weights go."""
        return [s.base_url for s in self.servers]

    def pick(self, key: str | None = None) -> VLLMEngine:
        """A session key always maps to the same engine (its prefix cache stays warm); otherwise least loaded."""
        self._rr += 1
        return pick(self.engines, key, self._rr)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
