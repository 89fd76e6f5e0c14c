"""Async HTTP client for one vLLM server: token-in/token-out generation and the RL control routes.

Generation uses `/inference/v1/generate` (both vLLM lines serve it; 0.32 needs `--enable-scale-out`, which the
server launcher adds): token ids in; token ids, sampled log-probs and weight-version spans out. Nothing is
re-tokenised. vLLM 0.26 has no `/weight_info` and no version spans, so the client tracks the version it last
finished itself and tags a request's tokens with the version held when the request started: a push mid-request
makes later tokens newer than their tag, never older, so a staleness bound on the tags still holds.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import httpx

from engines.common.engine import LoopHTTP
from engines.vllm.push_route import WORKERS_PATH
from engines.vllm.routes import ROUTES_TAG, RoutesError, from_npy_b64, merge
from vime.types import Completion, SamplingParams


class EngineRequestError(RuntimeError):
    pass


def sampling_payload(p: SamplingParams) -> dict[str, Any]:
    sp: dict[str, Any] = {
        "n": p.n,
        "max_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": p.top_k,
        "logprobs": 0,
    }
    if p.seed is not None:
        sp["seed"] = p.seed
    if p.stop:
        sp["stop"] = list(p.stop)
    if p.stop_token_ids:
        sp["stop_token_ids"] = list(p.stop_token_ids)
    if p.json_schema is not None:
        # whitespace inside the JSON is the server's choice in vLLM 0.32 (--structured-outputs-config)
        sp["structured_outputs"] = {"json": p.json_schema}
    sp.update(p.extra)
    return sp


def expand_versions(spans: list[dict[str, Any]] | None, n_tokens: int) -> list[str]:
    """`[{"version": "v1", "start": 0, "end": 3}, ...]` → one version string per output token."""
    if not spans:
        return []
    out = [""] * n_tokens
    for s in spans:
        for i in range(max(0, s["start"]), min(n_tokens, s["end"])):
            out[i] = str(s["version"])
    return out


def parse_choice(ch: dict[str, Any], fallback_version: str | None) -> Completion:
    ids = list(ch.get("token_ids") or [])
    content = (ch.get("logprobs") or {}).get("content") or []
    lps = [float(c["logprob"]) for c in content]
    if len(lps) != len(ids):
        raise EngineRequestError(f"engine returned {len(ids)} tokens but {len(lps)} log-probs")
    versions = expand_versions(ch.get("weight_versions"), len(ids))
    if not versions and fallback_version is not None:
        versions = [fallback_version] * len(ids)
    return Completion(
        token_ids=ids,
        logprobs=lps,
        finish_reason=ch.get("finish_reason") or "stop",
        text=ch.get("text") or "",
        weight_versions=versions,
    )


class VLLMClient(LoopHTTP):
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 600.0,
        version: tuple[int, int, int] = (0, 32, 0),
        route: str = "generate",
        model: str = "",
        route_sources: list[str] | None = None,
        native_routes: bool = False,
        explain: Callable[[], str] | None = None,
        one_sample_per_request: bool = False,
    ):
        self.base_url = base_url
        self.explain = explain  # a router's log tail: its 5xx answers say little ("No available workers")
        self.timeout_s = timeout_s
        self.vllm_version = version
        # "generate": /inference/v1/generate (a server); "completions": /v1/completions with token ids (a router,
        # which only forwards the OpenAI routes). Without version spans the client tracks the version itself.
        self.route = route
        self.model = model
        self.route_sources = route_sources  # behind a router: the servers whose recorded routes R3 merges
        # R3 from vLLM's own output (`enable_return_routed_experts`, vLLM 0.26 GPU); else vime's capture hook
        self.native_routes = native_routes
        # P/D: a request's KV is handed from the prefill to the decode server once, so n samples go as n requests
        self.one_sample_per_request = one_sample_per_request
        self.local_version: str | None = None if version >= (0, 27, 0) and route == "generate" else "default"

    async def _post(
        self, path: str, json: Any = None, params: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> Any:
        try:
            r = await self.http.post(path, json=json, params=params, headers=headers)
        except httpx.HTTPError as e:
            raise EngineRequestError(f"{self.base_url}{path}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            why = f"\n{self.explain()}" if self.explain and r.status_code >= 500 else ""
            raise EngineRequestError(f"{self.base_url}{path} -> {r.status_code}: {r.text[:500]}{why}")
        return r.json() if r.content else None

    async def complete_one(
        self, prompt_ids: list[int], params: SamplingParams, session: str | None = None
    ) -> list[Completion]:
        if params.n > 1 and self.one_sample_per_request:
            return await self.one_by_one(prompt_ids, params, session)
        sp = sampling_payload(params)
        sampled_by = self.local_version  # at the start: a push during the request makes later tokens newer, never older
        body = {
            "model": self.model,
            "prompt": list(prompt_ids),
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            **sp,
        }
        if params.routed_experts and self.native_routes:
            raise EngineRequestError("routing replay through a router needs vime's capture hook, not vLLM's own")
        if params.routed_experts:  # the tag rides in the body: a P/D router replaces the request's id
            body["vllm_xargs"] = {ROUTES_TAG: await self._routes_on()}
        # a router in front (consistent_hash) keeps a session on one server by this header
        data = await self._post("/v1/completions", body, headers={"x-session-id": session} if session else None)
        out = []
        for ch in sorted(data["choices"], key=lambda c: c["index"]):
            ids = list(ch.get("token_ids") or [])
            lps = [float(x) for x in (ch.get("logprobs") or {}).get("token_logprobs") or []]
            if len(lps) != len(ids):
                raise EngineRequestError(f"engine returned {len(ids)} tokens but {len(lps)} log-probs")
            out.append(
                Completion(
                    token_ids=ids,
                    logprobs=lps,
                    finish_reason=ch.get("finish_reason") or "stop",
                    text=ch.get("text") or "",
                    weight_versions=[sampled_by or ""] * len(ids),
                )
            )
        if params.routed_experts:
            await self._attach_routes(body["vllm_xargs"][ROUTES_TAG], prompt_ids, out)
        return out

    async def one_by_one(
        self, prompt_ids: list[int], params: SamplingParams, session: str | None = None
    ) -> list[Completion]:
        """n samples as n requests, seeded as vLLM seeds a request's n children (seed + index). Sent as one
        request through a P/D router, the prefill server computes n copies of the prompt's KV, the decode server
        learns the address of one, all n children read that one (released after the first read) and the other
        n - 1 stay held until their lease (30 s) runs out, stalling the next pause."""
        seeds = [None if params.seed is None else params.seed + i for i in range(params.n)]
        parts = await asyncio.gather(
            *(self.complete_one(prompt_ids, replace(params, n=1, seed=s), session) for s in seeds)
        )
        return [c for part in parts for c in part]

    async def generate_one(
        self, prompt_ids: list[int], params: SamplingParams, session: str | None = None
    ) -> list[Completion]:
        if self.route == "completions":
            return await self.complete_one(prompt_ids, params, session)
        body: dict[str, Any] = {
            "token_ids": list(prompt_ids),
            "sampling_params": sampling_payload(params),
            "stream": False,
        }
        if self.vllm_version >= (0, 27, 0):
            body["output_mode"] = "text"
            body["sampling_params"].setdefault("detokenize", True)
        else:
            # 0.26 leaves a non-streamed request CUMULATIVE and answers with the last update only, which for n > 1
            # holds just the children that finished last (seen on an H100: ~170 of 256 samples per GRPO step).
            # FINAL_ONLY (= 2) makes the engine aggregate all n children into the final output.
            body["sampling_params"].setdefault("output_kind", 2)
        sampled_by = self.local_version  # see complete_one
        capture = params.routed_experts and not self.native_routes
        if capture:
            body["sampling_params"]["extra_args"] = {ROUTES_TAG: await self._routes_on()}
        data = await self._post("/inference/v1/generate", body)
        choices = sorted(data["choices"], key=lambda c: c["index"])
        out = [parse_choice(c, sampled_by) for c in choices]
        if capture:
            await self._attach_routes(body["sampling_params"]["extra_args"][ROUTES_TAG], prompt_ids, out)
        elif params.routed_experts:
            self._native_routes(choices, prompt_ids, out)
        return out

    def _native_routes(self, choices: list[dict[str, Any]], prompt_ids: list[int], out: list[Completion]) -> None:
        for ch, c in zip(choices, out):
            blob = ch.get("routed_experts")
            if not blob:
                raise EngineRequestError(
                    f"{self.base_url}: no routed_experts in the answer: start the engine with "
                    "engine.args.enable_return_routed_experts: true (or leave it off for vime's capture hook)"
                )
            try:
                c.routed_experts = from_npy_b64(blob, len(prompt_ids) + len(c.token_ids) - 1)
            except RoutesError as e:
                raise EngineRequestError(f"{self.base_url}: {e}") from e

    async def _attach_routes(self, tag: str, prompt_ids: list[int], out: list[Completion]) -> None:
        """Each child's routes, from every server that computed part of the request (behind a router: all of
        them; their admin routes are reached directly, never through the router)."""
        found = []
        for url in self.route_sources or [""]:
            data = await self._post(url + WORKERS_PATH, {"method": "vime_routes_take", "kwargs": {"tag": tag}})
            results = (data or {}).get("results") or [None]
            if any(r is None for r in results):
                raise EngineRequestError(
                    f"{url or self.base_url}: routing capture is off (the server restarted mid-request?)"
                )
            # every worker of every data-parallel engine answers: TP workers route alike (the same children), an
            # engine holds the children it computed
            found.append({child: routes for r in results for child, routes in r.items()})
        lengths = [len(prompt_ids) + len(c.token_ids) - 1 for c in out]
        try:
            merged = merge(found, len(out), lengths)
        except RoutesError as e:
            raise EngineRequestError(f"{self.base_url}: request tagged {tag}: {e}") from e
        for c, routes in zip(out, merged):
            c.routed_experts = routes

    async def _routes_on(self) -> str:
        """A fresh tag for the request (its sampling params' extra_args carry it to the workers), with every
        server behind this client recording routes."""
        for url in self.route_sources or [""]:
            await self._post(url + WORKERS_PATH, {"method": "vime_routes_on", "kwargs": {}})
        return f"vime-{uuid.uuid4().hex}"

    async def generate(
        self, prompts: list[list[int]], params: SamplingParams, session: str | None = None
    ) -> list[list[Completion]]:
        return list(await asyncio.gather(*(self.generate_one(p, params, session) for p in prompts)))

    def stream_request(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, dict[str, Any]]:
        if params.n != 1:
            raise ValueError(f"a streamed request samples one completion (n=1), not n={params.n}")
        sp = sampling_payload(params)
        if self.route == "completions":
            body = {"model": self.model, "prompt": list(prompt_ids), "return_token_ids": True, **sp}
            return "/v1/completions", {**body, "return_tokens_as_token_ids": True, "stream": True}
        if self.vllm_version < (0, 27, 0):
            sp.setdefault("output_kind", 1)  # DELTA: each chunk holds the new tokens only, as 0.32 sends them
        return "/inference/v1/generate", {"token_ids": list(prompt_ids), "sampling_params": sp, "stream": True}

    async def stream(
        self, prompt_ids: list[int], params: SamplingParams, session: str | None = None
    ) -> AsyncIterator[Completion]:
        """The server's event stream, each chunk's new tokens appended: yields the completion so far."""
        path, body = self.stream_request(prompt_ids, params)
        ids: list[int] = []
        lps: list[float] = []
        finish, spans, sampled_by = "", None, self.local_version  # see complete_one
        headers = {"x-session-id": session} if session else None
        try:
            async for chunk in self.events(path, body, EngineRequestError, headers):
                for ch in chunk.get("choices") or []:
                    ids += ch.get("token_ids") or []
                    lp = ch.get("logprobs") or {}
                    lps += [float(c["logprob"]) for c in lp.get("content") or []]
                    lps += [float(x) for x in lp.get("token_logprobs") or []]
                    finish = ch.get("finish_reason") or finish
                    spans = ch.get("weight_versions") or spans
                if len(lps) != len(ids):
                    raise EngineRequestError(f"engine streamed {len(ids)} tokens but {len(lps)} log-probs")
                if not finish:
                    yield Completion(list(ids), list(lps), "")
        except httpx.HTTPError as e:
            raise EngineRequestError(f"{self.base_url}{path}: {type(e).__name__}: {e}") from e
        versions = expand_versions(spans, len(ids)) or [sampled_by or ""] * len(ids)
        yield Completion(ids, lps, finish or "stop", weight_versions=versions)

    async def pause(self, mode: str = "keep") -> None:
        await self._post("/pause", params={"mode": mode})

    async def resume(self) -> None:
        await self._post("/resume")

    async def reset_prefix_cache(self) -> None:
        await self._post("/reset_prefix_cache")

    async def weight_version(self) -> str:
        if self.local_version is not None:
            return self.local_version
        r = await self.http.get("/weight_info")
        r.raise_for_status()
        return str(r.json()["weight_version"])

    async def healthy(self) -> bool:
        try:
            return (await self.http.get("/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def collective_rpc(self, method: str, **kwargs: Any) -> list[Any]:
        data = await self._post("/collective_rpc", {"method": method, "kwargs": kwargs})
        return data.get("results", [])
