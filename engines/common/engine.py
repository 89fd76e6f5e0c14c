"""What every engine's `vime.protocols.Engine` does the same way around its own HTTP client: count requests in
flight (the group's least-loaded pick reads it), and answer health from a short-lived cache (a probe per request
would double the HTTP traffic). The client is the engine's own; the server is a `ServerProcess`, a Ray actor's
`RemoteServer` or an `External` one."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from vime.secret import auth_headers
from vime.types import Completion, SamplingParams


class LoopHTTP:
    """An httpx client per event loop: asyncio.run() in a CLI and pytest's loops must not share connections. The
    engines vime starts refuse requests without the run's secret, so it is always sent."""

    base_url: str
    timeout_s: float
    _http: httpx.AsyncClient | None = None
    _loop: Any = None

    @property
    def http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._http is None or self._loop is not loop:
            self._http = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=self.timeout_s,
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
                headers=auth_headers(),
            )
            self._loop = loop
        return self._http

    async def events(
        self, path: str, body: Any, error: type[Exception], headers: dict[str, str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """The JSON chunks of a server-sent event stream (`data: {...}` lines up to `data: [DONE]`); an HTTP error
        status, or an error chunk mid-stream, raises `error` with the server's answer."""
        async with self.http.stream("POST", path, json=body, headers=headers) as r:
            if r.status_code >= 400:
                text = (await r.aread()).decode(errors="replace")
                raise error(f"{self.base_url}{path} -> {r.status_code}: {text[:500]}")
            async for line in r.aiter_lines():
                data = line.removeprefix("data:").strip()
                if not line.startswith("data:") or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise error(f"{self.base_url}{path} stream: {str(chunk['error'])[:500]}")
                yield chunk

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


class ServedEngine:
    HEALTH_TTL_S = 2.0

    def __init__(self, server: Any, client: Any):
        self.server = server
        self.client = client
        self.inflight = 0
        self._health = (0.0, False)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    async def generate(
        self, prompts: list[list[int]], params: SamplingParams, session: str | None = None
    ) -> list[list[Completion]]:
        self.inflight += len(prompts)
        try:
            return await self.client.generate(prompts, params, session)
        finally:
            self.inflight -= len(prompts)

    async def stream(
        self, prompt: list[int], params: SamplingParams, session: str | None = None
    ) -> AsyncIterator[Completion]:
        self.inflight += 1
        try:
            async for c in self.client.stream(prompt, params, session):
                yield c
        finally:
            self.inflight -= 1

    async def healthy(self) -> bool:
        checked, ok = self._health
        if time.monotonic() - checked > self.HEALTH_TTL_S:
            # alive() of a server in a Ray actor is a blocking actor call: off the event loop
            ok = await asyncio.to_thread(self.server.alive) and await self.client.healthy()
            self._health = (time.monotonic(), ok)
        return ok
