"""ASGI middleware vime adds to every vLLM server it starts (`--middleware engines.vllm.guard.EngineGuard`).

vLLM's own `--api-key` guards only the OpenAI-style prefixes (/v1, /v2, /inference, /cohere); the RL routes vime
needs (`VLLM_SERVER_DEV_MODE`: /pause, /collective_rpc, /sleep, the weight-transfer routes) stay open to any local
process. This guard asks for the run's secret (`vime.secret`, from the server's environment) on every route but
the liveness and metrics probes.

vllm-router is a transparent proxy: in P/D mode it forwards *any* path to both servers with its own
`Bearer $OPENAI_API_KEY`, whoever called it. So the router never holds the secret: it gets a key derived from it
that the guard accepts on the generation routes only; a caller cannot pause, sleep or update an engine through it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

from vime.secret import ENV, router_key

OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})
ROUTER_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"})

Scope = dict[str, Any]


class EngineGuard:
    def __init__(self, app: Any) -> None:
        secret = os.environ.get(ENV)
        if not secret:  # never serve unguarded by accident: the launcher always sets it
            raise RuntimeError(f"{ENV} is not set in the vLLM server's environment; the engine guard needs it")
        self.app = app
        self.admin = self.digest(f"Bearer {secret}".encode())
        self.router = self.digest(f"Bearer {router_key(secret)}".encode())

    @staticmethod
    def digest(header: bytes) -> bytes:
        return hashlib.sha256(header).digest()  # fixed length: compare_digest then leaks nothing about the key

    def allowed(self, scope: Scope) -> bool:
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            return True  # lifespan events; CORS preflights carry no credentials by design
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path in OPEN_PATHS:
            return True
        given = self.digest(dict(scope.get("headers") or []).get(b"authorization", b""))
        if hmac.compare_digest(given, self.admin):
            return True
        return path in ROUTER_PATHS and hmac.compare_digest(given, self.router)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if self.allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # a websocket without the secret: refuse the handshake
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(
            {"error": {"message": "this engine was started by vime: send the run's secret", "type": "unauthorized"}}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
