"""N SGLang servers as one engine group: started together (locally or in Ray actors on their bundles), stopped
together with nothing left behind, requests routed by session key."""

from __future__ import annotations

import atexit
import json
from pathlib import Path
from typing import Any, Self

import httpx

from engines.common.engine import ServedEngine
from engines.common.servers import External, launch, launch_retrying, pick
from engines.sglang.client import SGLangClient
from engines.sglang.config import SGLangEngineConfig
from vime.secret import ENV as SECRET_ENV
from vime.secret import auth_headers, run_secret

# SGLang 0.5.17 models whose lm_head never reads tie_word_embeddings: a tied checkpoint has no lm_head.weight, so
# the head keeps its initial values and every log-prob is off (0.53 nats against the trainer, seen on an H100).
NO_TIED_HEAD = {"qwen3_moe": "Qwen3MoeForCausalLM"}


def refuse_tied_head(model_path: str) -> None:
    cfg = Path(model_path) / "config.json"
    if not cfg.is_file():
        return
    hf = json.loads(cfg.read_text())
    arch = NO_TIED_HEAD.get(hf.get("model_type", ""))
    if arch and hf.get("tie_word_embeddings"):
        raise ValueError(
            f"{cfg}: tie_word_embeddings is true, but SGLang's {arch} ignores it (its lm_head would keep its "
            "initial values); save the model untied (lm_head.weight, tie_word_embeddings: false) or use "
            "engine.name: vllm"
        )


class SGLangEngine(ServedEngine):
    """One server + its client: the `vime.protocols.Engine` for SGLang."""

    def __init__(self, server: Any, request_timeout_s: float, seeds_honoured: bool = False, topk: int | None = None):
        client = SGLangClient(server.base_url, timeout_s=request_timeout_s, seeds_honoured=seeds_honoured, topk=topk)
        super().__init__(server, client)


class SGLangEngineGroup:
    def __init__(
        self,
        cfg: SGLangEngineConfig,
        *,
        model_path: str,
        log_dir: str,
        weights_backend: str | None = None,
        placement: tuple[Any, list[int]] | None = None,
        sleep_mode: bool = False,
    ):
        self.cfg = cfg
        self.model_path = model_path
        self.log_dir = Path(log_dir)
        self.weights_backend = weights_backend
        self.placement = placement
        self.sleep_mode = sleep_mode
        self.servers: list[Any] = []
        self.engines: list[SGLangEngine] = []
        self.version = "default"
        self._rr = 0

    @property
    def topk(self) -> int | None:
        """Experts per token of a Mixture-of-Experts model (routing replay shapes SGLang's flat routes by it)."""
        cfg = Path(self.model_path) / "config.json"
        return json.loads(cfg.read_text()).get("num_experts_per_tok") if cfg.is_file() else None

    @property
    def seeds_honoured(self) -> bool:
        return bool(self.cfg.args.get("enable_deterministic_inference"))

    def _server_kwargs(self, i: int, port: int | None) -> dict[str, Any]:
        args = dict(self.cfg.args)
        if self.sleep_mode:  # release/resume_memory_occupation free memory only with the memory saver
            args.setdefault("enable_memory_saver", True)
        return {
            "host": self.cfg.host,
            "port": port,
            "args": args,
            "env": {SECRET_ENV: run_secret(), **self.cfg.env},
            "log_path": self.log_dir / f"sglang_{i}.log",
            "startup_timeout_s": self.cfg.startup_timeout_s,
        }

    def _launch(self, indices: list[int], ports: list[int | None]) -> list[Any]:
        return launch(
            "engines.sglang.server:SGLangServer",
            self.model_path,
            [self._server_kwargs(i, p) for i, p in zip(indices, ports)],
            self.placement,
            indices,
            cpus=self.cfg.cpus_per_engine,
            gpus=self.cfg.gpus_per_engine,
        )

    @classmethod
    def attach(cls, urls: list[str], cfg: SGLangEngineConfig | None = None) -> SGLangEngineGroup:
        """A group over servers started elsewhere; stop() leaves them running."""

        group = cls(cfg or SGLangEngineConfig(name="sglang"), model_path="", log_dir=".")
        group.servers = [External(u) for u in urls]
        group.engines = [SGLangEngine(s, group.cfg.request_timeout_s) for s in group.servers]
        return group

    def start(self) -> Self:
        if self.servers:  # already running: never launch a second set
            return self
        refuse_tied_head(self.model_path)
        atexit.register(self.stop)
        n = self.cfg.num_engines
        self.servers = launch_retrying(
            lambda: self._launch(list(range(n)), [None] * n), self.cfg.start_retries, "SGLang"
        )
        self.engines = [
            SGLangEngine(s, self.cfg.request_timeout_s, self.seeds_honoured, self.topk) for s in self.servers
        ]
        return self

    def stop(self) -> None:
        """Idempotent (also registered with atexit)."""
        servers, self.servers, self.engines = self.servers, [], []
        for s in servers:
            s.stop()

    def restart(self, i: int) -> None:
        """Server i replaced by a fresh one on the same port with the model directory's weights (version back
        to SGLang's initial one; the caller re-syncs)."""
        old = self.servers[i]
        old.stop()
        (server,) = self._launch([i], [old.port])
        if i >= len(self.servers) or self.servers[i] is not old:  # stop() (or another restart) ran meanwhile
            server.stop()
            raise RuntimeError(f"engine server {i} was restarted while its group was being stopped")
        self.servers[i] = server
        self.engines[i] = SGLangEngine(server, self.cfg.request_timeout_s, self.seeds_honoured, self.topk)

    def dead(self) -> list[int]:
        return [i for i, s in enumerate(self.servers) if not s.alive()]

    def urls(self) -> list[str]:
        return [s.base_url for s in self.servers]

    def pick(self, key: str | None = None) -> SGLangEngine:
        self._rr += 1
        return pick(self.engines, key, self._rr)

    def note_weight_version(self, version: str) -> None:
        """New requests are tagged with this version (see `engines.sglang.client`)."""
        self.version = version
        for e in self.engines:
            e.client.local_version = version

    def _post_all(self, path: str, body: Any) -> None:
        for s in self.servers:
            r = httpx.post(s.base_url + path, json=body, timeout=self.cfg.request_timeout_s, headers=auth_headers())
            if r.status_code >= 400:
                raise RuntimeError(f"{s.base_url}{path} -> {r.status_code}: {r.text[:300]}")

    def sleep(self, level: int = 1) -> None:
        """Free the servers' GPU memory (weights and KV cache; SGLang drops the weights unless started with
        `--enable-weights-cpu-backup`, so a push follows `wake_up`). Needs `--enable-memory-saver`, which the
        group adds when the engines are colocated."""
        self._post_all("/release_memory_occupation", {"tags": None})

    def wake_up(self, tags: list[str] | None = None) -> None:
        """`["weights"]` before a push, `["kv_cache"]` after it; None: everything. `sleep` also released SGLang's
        CUDA-graph memory (a third tag vime's protocol does not name): it comes back with the KV cache."""
        if tags is not None and "kv_cache" in tags:
            tags = [*tags, "cuda_graph"]
        self._post_all("/resume_memory_occupation", {"tags": tags})

    def step_metrics(self) -> dict[str, float]:
        """Time to first token summed over servers, from SGLang's Prometheus /metrics (served with
        `--enable-metrics`; without it only the gauges)."""
        out = {"engines/servers": float(len(self.servers)), "engines/prefill_servers": 0.0}
        out["engines/decode_servers"] = 0.0
        for s in self.servers:
            try:
                text = httpx.get(s.base_url + "/metrics", timeout=5, headers=auth_headers()).text
            except httpx.HTTPError:
                continue
            for line in text.splitlines():
                if line.startswith(
                    ("sglang:time_to_first_token_seconds_sum", "sglang:time_to_first_token_seconds_count")
                ):
                    key = "ttft/" + line.split("{")[0].rsplit("_", 1)[1]
                    out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
