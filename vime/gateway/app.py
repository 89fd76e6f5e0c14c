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

from vime.gateway.config import GatewayConfig
from vime.gateway.constrain import forced_calls, output_schema
from vime.gateway.responses import install_responses
from vime.gateway.schema import APIError, ChatRequest, CompletionRequest, error_response, parse
from vime.gateway.session_routes import install_session_routes
from vime.gateway.sessions import Cursor, SessionStore, Turn
from vime.gateway.stream import stream_chat, stream_completion
from vime.gateway.tools import TOOL_PARSERS
from vime.protocols import EnginePool
from vime.types import Completion, SamplingParams


def make_app(engines: EnginePool, tokenizer: Any, cfg: GatewayConfig, store: SessionStore | None = None) -> FastAPI:
    app = FastAPI(title="vime gateway")
    app.state.store = store = store or SessionStore(tokenizer)
    model_name = cfg.model_name or "vime"
    parse_tools = TOOL_PARSERS.get(cfg.tool_parser)
    vocab = len(tokenizer)
    markers = {tokenizer.convert_tokens_to_ids(m) for m in getattr(parse_tools, "markers", ())}
    specials = set(tokenizer.all_special_ids)

    def decode(ids: list[int], tools: bool = False) -> str:
        """Special tokens skipped, but a tool request keeps its parser's markers."""
        drop = specials - markers if tools else specials
        return str(tokenizer.decode([t for t in ids if t not in drop], skip_special_tokens=False))

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

    async def engine_for(key: str | None) -> Any:
        first = engines.pick(key)
        for e in [first] + [e for e in engines.engines if e is not first]:
            if await e.healthy():
                return e
        raise APIError(503, "no healthy inference engine", "service_unavailable")

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

    def check_length(prompt_ids: list[int], max_tokens: int, param: str) -> None:
        if len(prompt_ids) + max_tokens > cfg.context_length:
            raise APIError(
                400,
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"context length {cfg.context_length}",
                param=param,
                code="context_length_exceeded",
            )

    def params_of(req: Any, max_tokens: int, schema: dict[str, Any] | None = None) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return SamplingParams(
            n=req.n,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=stop,
            json_schema=schema,
        )

    def logprobs_content(c: Completion) -> list[dict[str, Any]]:
        out = []
        for t, lp in zip(c.token_ids, c.logprobs):
            s = tokenizer.decode([t])
            out.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []})
        return out

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
        resp = await run_chat(req, sid or request.headers.get("x-session-id") or req.user)
        return stream_chat(resp) if req.stream else resp

    async def run_chat(req: ChatRequest, sid: str | None) -> dict[str, Any]:
        """One chat turn: the prompt (continuing the session's exact tokens), the engine call, the reply parsed
        for tool calls, the turn recorded; the answer as a Chat Completions body (Responses converts it)."""
        mode, schema = output_schema(req)
        asked = req.max_completion_tokens or req.max_tokens
        session = store.get(sid) if sid else None
        try:  # the template and tokenizer run off the event loop: a long body must not stall /health
            cursor = await asyncio.to_thread(
                lambda: (
                    store.prompt_for(session, req.messages, req.tools)
                    if session
                    else Cursor(store.builder.first_prompt(req.messages, req.tools))
                )
            )
            prompt_ids = cursor.ids
        except Exception as e:  # noqa: BLE001 - a template that cannot render these messages
            raise APIError(400, f"cannot apply the chat template to 'messages': {e}", param="messages") from None
        # like vLLM: an unset max_tokens shrinks to what the context has left; one the client set is checked
        max_tokens = asked or max(1, min(cfg.default_max_tokens, cfg.context_length - len(prompt_ids)))
        check_length(prompt_ids, max_tokens, "messages")
        engine = await engine_for(sid)
        (completions,) = await engine.generate([prompt_ids], params_of(req, max_tokens, schema), session=sid)
        choices = []
        for i, c in enumerate(completions):
            text = decode(c.token_ids, tools=mode == "tools")
            content, calls = parse_tools(text) if mode == "tools" else (text, [])
            if mode == "forced":
                calls = forced_calls(text)
                content = None if calls else text
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            finish = "tool_calls" if calls else ("length" if c.finish_reason == "length" else "stop")
            choice = {"index": i, "message": message, "finish_reason": finish, "token_ids": c.token_ids}
            if req.logprobs:
                choice["logprobs"] = {"content": logprobs_content(c)}
            choices.append(choice)
            if session is not None and i == 0:  # a session follows its first choice
                store.record(
                    session,
                    cursor,
                    req.messages,
                    Turn(
                        prompt_ids,
                        c.token_ids,
                        c.logprobs,
                        c.finish_reason,
                        c.weight_versions,
                        text,
                        engine.base_url,
                        req.temperature,
                    ),
                    message,
                )
        usage = {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": sum(len(c.token_ids) for c in completions),
            "total_tokens": len(prompt_ids) + sum(len(c.token_ids) for c in completions),
        }
        resp = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": choices,
            "usage": usage,
            "prompt_token_ids": prompt_ids,
        }
        return resp

    install_responses(app, run_chat, body_of, check_model, cfg.max_sessions)  # Chat Completions underneath

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
            check_length(x, req.max_tokens, "prompt")
        engine = await engine_for(sid or request.headers.get("x-session-id") or req.user)
        results = await engine.generate(ids, params_of(req, req.max_tokens))
        choices: list[dict[str, Any]] = []
        for group in results:
            for c in group:
                choice = {
                    "index": len(choices),
                    "text": decode(c.token_ids),
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
