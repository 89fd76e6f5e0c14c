"""Run the gateway app with uvicorn in a background thread of this process (it shares the engine group and the
session store with the rollout code), or in the foreground for `vime serve`."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from typing import Any, Self

import uvicorn

from vime.gateway.app import make_app
from vime.gateway.config import GatewayConfig
from vime.gateway.sessions import SessionStore
from vime.protocols import EnginePool
from vime.registry import DEFAULT_ENGINE
from vime.specs import engine_spec


def resolve_api_key(cfg: GatewayConfig) -> str:
    return cfg.api_key or os.environ.get("VIME_API_KEY") or f"vime-{secrets.token_hex(16)}"


class Gateway:
    def __init__(self, engines: EnginePool, tokenizer: Any, cfg: GatewayConfig):
        self.cfg = cfg.model_copy(update={"api_key": resolve_api_key(cfg)})
        if not self.cfg.port:
            with socket.socket() as s:
                s.bind((self.cfg.host, 0))
                self.cfg.port = s.getsockname()[1]
        self.store = SessionStore(tokenizer, self.cfg.session_ttl_s, self.cfg.max_sessions)
        self.app = make_app(engines, tokenizer, self.cfg, self.store)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host=self.cfg.host, port=self.cfg.port, log_level="warning", access_log=False)
        )
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}/v1"

    def session_url(self, sid: str) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}/sessions/{sid}/v1"

    @property
    def api_key(self) -> str:
        return str(self.cfg.api_key)

    def take_counts(self) -> dict[str, float]:
        """Since the last call: error answers by status class (`gateway/http_4xx`, `gateway/http_5xx`), and
        session forks, history rewrites and evictions."""
        errors: dict[str, int] = self.app.state.errors
        out = {f"gateway/http_{k}": float(v) for k, v in errors.items()}
        errors.clear()
        return out | self.store.take_counts()

    def start(self) -> Self:
        self.thread = threading.Thread(target=self.server.run, name="vime-gateway", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"gateway did not start on {self.cfg.host}:{self.cfg.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """`python -m vime.gateway.server --engine-url http://127.0.0.1:8001 --tokenizer DIR`: a gateway in front of
    engines (or a router) that are already running, in its own process."""
    import argparse

    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(prog="python -m vime.gateway.server")
    p.add_argument("--engine-url", action="append", required=True)
    p.add_argument("--engine", default=DEFAULT_ENGINE, help="registered engine name or 'pkg.module:SPEC'")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--context-length", type=int, default=4096, help="prompt + max_tokens limit per request")
    a = p.parse_args(argv)
    engines = engine_spec(a.engine).attach(a.engine_url)
    cfg = GatewayConfig(
        host=a.host,
        port=a.port,
        api_key=a.api_key,
        model_name=a.model_name or a.tokenizer,
        context_length=a.context_length,
    )
    gw = Gateway(engines, AutoTokenizer.from_pretrained(a.tokenizer), cfg)
    print(f"vime gateway on {gw.base_url} (API key {'set' if a.api_key else gw.api_key})", flush=True)
    gw.server.run()


if __name__ == "__main__":
    main()
