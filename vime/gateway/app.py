"""The OpenAI-compatible endpoint: chat and text completions over the engine group, with every chat turn
recorded as exact token ids and log-probs per session.

A session is named by the `x-session-id` header, the `user` field, or the URL prefix `/sessions/<id>/v1`
(what agent rollouts hand to an agent as its `base_url`, so the agent needs no vime-specific code).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vime.gateway.chat import ChatTurns
from vime.gateway.config import GatewayConfig
from vime.gateway.responses import install_responses
from vime.gateway.schema import APIError, ChatRequest, CompletionRequest, error_response, parse
from vime.gateway.session_routes import install_session_routes
from vime.gateway.sessions import SessionStore
from vime.gateway.stream import completion_chunks, live, stream_chat, stream_chat_live, stream_completion
from vime.protocols import EnginePool


def make_app(engines: EnginePool, tokenizer: Any, cfg: GatewayConfig, store: SessionStore | None = None) -> FastAPI:
    app = FastAPI(title="vime gateway")
    app.state.store = store = store or SessionStore(tokenizer)
    model_name = cfg.model_name or "vime"
    turns = ChatTurns(engines, tokenizer, cfg, store)
    vocab = len(tokenizer)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:  # OpenAI's shape even for our own bugs
        return error_response(APIError(500, f"{type(e).__name__}: {e}", "internal_error"))

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Unknown routes and methods in OpenAI's error shape (clients show `message`), naming the path."""
        what = "no route" if e.status_code == 404 else str(e.detail)
        return error_response(APIError(e.status_code, f"{what}: {request.method} {request.url.path}", code=None))

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if (
            cfg.api_key
            and request.url.path != "/health"
            and request.headers.get("authorization", "") != f"Bearer {cfg.api_key}"
        ):
            return error_response(
                APIError(
                    401,
                    "missing or wrong API key (Authorization: Bearer <key>)",
                    "authentication_error",
                    code="invalid_api_key",
                )
            )
        return await call_next(request)

    app.state.errors = errors = dict[str, int]()  # status class -> error answers, taken per step by the loop

    @app.middleware("http")  # added last, so outermost: it sees the key check's 401s too
    async def _count_errors(request: Request, call_next: Any) -> Any:
        """Agents often swallow an error answer and go on: the run still sees how many they got."""
        try:
            response = await call_next(request)
        except Exception:
            errors["5xx"] = errors.get("5xx", 0) + 1
            raise
        if response.status_code >= 400:
            key = f"{response.status_code // 100}xx"
            errors[key] = errors.get(key, 0) + 1
        return response

    async def body_of(request: Request) -> Any:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes exceeds gateway.max_body_bytes={cfg.max_body_bytes}")
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            raise APIError(413, f"request body of {len(raw)} bytes exceeds gateway.max_body_bytes={cfg.max_body_bytes}")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "request body is not valid JSON") from None

    def check_ids(ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"'{param}' holds token id {bad}, outside the vocabulary [0, {vocab})", param=param)

    def check_model(name: str) -> None:
        if name not in (model_name, getattr(engines, "model_path", None)):
            raise APIError(
                404,
                f"model '{name}' does not exist; this gateway serves '{model_name}'",
                param="model",
                code="model_not_found",
            )

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = [await e.healthy() for e in engines.engines]
        return JSONResponse(status_code=200 if any(ok) else 503, content={"healthy_engines": sum(ok)})

    @app.get("/v1/models")
    @app.get("/sessions/{sid}/v1/models")
    async def models(sid: str | None = None) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "vime", "created": 0}]}

    install_session_routes(app, store)

    @app.post("/v1/chat/completions")
    @app.post("/sessions/{sid}/v1/chat/completions")
    async def chat(request: Request, sid: str | None = None) -> Any:
        req = parse(ChatRequest, await body_of(request))
        check_model(req.model)
        sid = sid or request.headers.get("x-session-id") or req.user
        if not req.stream:
            return await turns.run(req, sid)
        if req.n > 1:  # the engine streams one completion at a time: n of them go out whole, as chunks
            return stream_chat(await turns.run(req, sid))
        return stream_chat_live(turns.stream(await turns.prepare(req, sid)), req.model, errors)

    install_responses(app, turns, body_of, check_model, cfg.max_sessions, errors)  # Chat Completions underneath

    @app.post("/v1/completions")
    @app.post("/sessions/{sid}/v1/completions")
    async def completions(request: Request, sid: str | None = None) -> Any:
        req = parse(CompletionRequest, await body_of(request))
        check_model(req.model)
        p = req.prompt
        prompts = ([p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)) if p else [""]
        ids = await asyncio.to_thread(
            lambda: [
                list(x) if isinstance(x, list) else list(tokenizer.encode(x, add_special_tokens=False)) for x in prompts
            ]
        )
        for x in ids:
            check_ids(x, "prompt")
            turns.check_length(x, req.max_tokens, "prompt")
        engine = await turns.engine_for(sid or request.headers.get("x-session-id") or req.user)
        params = turns.params_of(req, req.max_tokens)
        if req.stream and len(ids) == 1 and req.n == 1:
            pieces = engine.stream(ids[0], params, session=sid)
            return live(completion_chunks(pieces, turns.decode, req.model, req.logprobs is not None), errors)
        results = await engine.generate(ids, params)
        choices: list[dict[str, Any]] = []
        for group in results:
            for c in group:
                choice = {
                    "index": len(choices),
                    "text": turns.decode(c.token_ids),
                    "finish_reason": "length" if c.finish_reason == "length" else "stop",
                    "token_ids": c.token_ids,
                    "logprobs": None,
                }
                if req.logprobs is not None:
                    choice["logprobs"] = {
                        "tokens": [tokenizer.decode([t]) for t in c.token_ids],
                        "token_logprobs": c.logprobs,
                        "top_logprobs": None,
                        "text_offset": [],
                    }
                choices.append(choice)
        n_out = sum(len(c["token_ids"]) for c in choices)
        resp = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": sum(map(len, ids)),
                "completion_tokens": n_out,
                "total_tokens": sum(map(len, ids)) + n_out,
            },
        }
        return stream_completion(resp) if req.stream else resp

    return app
