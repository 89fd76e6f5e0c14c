"""Async HTTP client for one SGLang server: token ids in, token ids + sampled log-probs out (SGLang's native
`/generate`), and the control routes the group and the channel use.

Each of a prompt's `n` completions is its own item of one batched request, so child k can carry seed + k (SGLang's
own `n` would give every child the same `sampling_seed`). SGLang honours seeds only when started with
`--enable-deterministic-inference`; without it a seed is silently ignored, so the client says so once.

SGLang reports one weight version per response, read when the response is sent: a push during the request would
label old-weight tokens new. The client tags a request's tokens with the version it held when the request
started instead (the group sets it after every push), which errs old, never new, so a staleness bound holds.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np

from engines.common.engine import LoopHTTP
from vime.types import Completion, SamplingParams

log = logging.getLogger(__name__)

# vime's pause modes -> SGLang's /pause_generation modes (SGLang has no "drain first"; the spec refuses `wait`)
PAUSE_MODES = {"keep": "in_place", "abort": "abort"}


class EngineRequestError(RuntimeError):
    pass


def sampling_params(p: SamplingParams, child: int) -> dict[str, Any]:
    """SGLang's `sampling_params` for child `child` of a request; SGLang refuses unknown keys (a TypeError in its
    SamplingParams), so `params.extra` must hold SGLang's own names."""
    sp: dict[str, Any] = {
        "max_new_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": p.top_k if p.top_k and p.top_k > 0 else -1,
    }
    if p.seed is not None:
        sp["sampling_seed"] = p.seed + child
    if p.stop:
        sp["stop"] = list(p.stop)
    if p.stop_token_ids:
        sp["stop_token_ids"] = list(p.stop_token_ids)
    if p.json_schema is not None:
        sp["json_schema"] = json.dumps(p.json_schema)
    sp.update(p.extra)
    return sp


def finish(meta: dict[str, Any]) -> str:
    """`{"type": "stop" | "length" | "abort", ...}` → vime's finish reason; None (still running) → ""."""
    reason = meta.get("finish_reason")
    if reason is None:
        return ""
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    return kind if kind in ("stop", "length") else "abort"


def decode_routes(meta: dict[str, Any], rows: int, topk: int) -> np.ndarray:
    """SGLang's `meta_info.routed_experts` (`return_routed_experts`): base64 of int32 [prompt + output - 1, layers,
    k], every layer (a dense one's rows mean nothing)."""
    blob = meta.get("routed_experts")
    if not blob:
        raise EngineRequestError(
            "SGLang answered without routed_experts: start it with engine.args.enable_return_routed_experts: true"
        )
    flat = np.frombuffer(base64.b64decode(blob), dtype=np.int32)
    if rows <= 0 or flat.size % (rows * topk):
        raise EngineRequestError(
            f"SGLang's routed_experts holds {flat.size} ids, not {rows} positions x layers x {topk}"
        )
    return flat.reshape(rows, -1, topk).astype(np.int16)


def parse_item(item: dict[str, Any], version: str) -> Completion:
    ids = [int(t) for t in item.get("output_ids") or []]
    meta = item.get("meta_info") or {}
    entries = meta.get("output_token_logprobs") or []
    if [int(e[1]) for e in entries] != ids:
        raise EngineRequestError(
            f"SGLang returned {len(ids)} tokens but log-probs for {len(entries)} "
            f"(or for other token ids): output_ids={ids[:8]}..., output_token_logprobs={entries[:4]}..."
        )
    return Completion(
        token_ids=ids,
        logprobs=[float(e[0]) for e in entries],
        finish_reason=finish(meta) or "stop",
        text=item.get("text") or "",
        weight_versions=[version] * len(ids),
    )


class SGLangClient(LoopHTTP):
    def __init__(
        self, base_url: str, *, timeout_s: float = 600.0, seeds_honoured: bool = False, topk: int | None = None
    ):
        self.base_url = base_url
        self.topk = topk  # MoE: experts per token, to shape routing replay's routes
        self.timeout_s = timeout_s
        self.local_version = "default"  # SGLang's own initial version (`--weight-version`)
        self._warned_seed = seeds_honoured  # started with --enable-deterministic-inference: nothing to say

    async def _post(self, path: str, body: Any = None) -> Any:
        try:
            r = await self.http.post(path, json=body if body is not None else {})
        except httpx.HTTPError as e:
            raise EngineRequestError(f"{self.base_url}{path}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            raise EngineRequestError(f"{self.base_url}{path} -> {r.status_code}: {r.text[:500]}")
        try:
            return r.json() if r.content else None
        except ValueError:
            return r.text

    def _check_seed(self, p: SamplingParams) -> None:
        if p.seed is not None and not self._warned_seed:
            self._warned_seed = True
            log.warning(
                "SGLang applies per-request seeds only when started with --enable-deterministic-inference "
                "(engine.args.enable_deterministic_inference: true); otherwise sampling_seed is ignored"
            )

    async def generate(
        self, prompts: list[list[int]], params: SamplingParams, session: str | None = None
    ) -> list[list[Completion]]:
        if not prompts:
            return []
        self._check_seed(params)
        n = params.n
        body = {
            "input_ids": [list(p) for p in prompts for _ in range(n)],
            "sampling_params": [sampling_params(params, k) for _ in prompts for k in range(n)],
            "return_logprob": True,
        }
        if params.routed_experts:
            if not self.topk:
                raise EngineRequestError("routing replay needs a Mixture-of-Experts model (no num_experts_per_tok)")
            body["return_routed_experts"] = True
        version = self.local_version  # at the start: see the module's docstring
        data = await self._post("/generate", body)
        items = data if isinstance(data, list) else [data]
        if len(items) != n * len(prompts):
            raise EngineRequestError(f"SGLang answered {len(items)} items for {n * len(prompts)} requested")
        out = [parse_item(it, version) for it in items]
        if params.routed_experts:
            prompt_of = [p for p in prompts for _ in range(n)]
            for it, c, p in zip(items, out, prompt_of):
                meta = it.get("meta_info") or {}
                c.routed_experts = decode_routes(meta, len(p) + len(c.token_ids) - 1, self.topk or 1)
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    async def stream(
        self, prompt_ids: list[int], params: SamplingParams, session: str | None = None
    ) -> AsyncIterator[Completion]:
        """SGLang streams cumulative chunks (each holds the whole output so far): yields each one."""
        if params.n != 1:
            raise ValueError(f"a streamed request samples one completion (n=1), not n={params.n}")
        self._check_seed(params)
        body = {
            "input_ids": list(prompt_ids),
            "sampling_params": sampling_params(params, 0),
            "return_logprob": True,
            "stream": True,
        }
        version, last = self.local_version, None
        try:
            async for chunk in self.events("/generate", body, EngineRequestError):
                c = parse_item(chunk, version)
                last = (c, finish(chunk.get("meta_info") or {}))
                if not last[1]:
                    yield Completion(c.token_ids, c.logprobs, "", c.text)
        except httpx.HTTPError as e:
            raise EngineRequestError(f"{self.base_url}/generate: {type(e).__name__}: {e}") from e
        if last is None:
            raise EngineRequestError(f"{self.base_url}/generate stream ended without output")
        c, reason = last
        yield Completion(c.token_ids, c.logprobs, reason or "stop", c.text, c.weight_versions)

    async def pause(self, mode: str = "keep") -> None:
        await self._post("/pause_generation", {"mode": PAUSE_MODES[mode]})

    async def resume(self) -> None:
        await self._post("/continue_generation", {})

    async def weight_version(self) -> str:
        """What the server reports (`/model_info`; 0.5.17 answers 404 on the old `/weight_version`)."""
        r = await self.http.get("/model_info")
        r.raise_for_status()
        return str(r.json()["weight_version"])

    async def healthy(self) -> bool:
        # /model_info, not /health: SGLang's /health generates a token and waits out a pause (503 after 20 s)
        try:
            return (await self.http.get("/model_info", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False
