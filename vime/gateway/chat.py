"""One chat turn, the way Chat Completions and Responses both run it: the prompt continuing the session's exact
tokens, the engine call (whole or streamed), the reply parsed for tool calls, the turn recorded.

A streamed turn hands text out as the engine samples it, except what may still become a tool call (from the
parser's opening marker on) or half a character: that waits for the end, where the reply is parsed whole, exactly
as an unstreamed one is, and recorded the same way.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from vime.gateway.config import GatewayConfig
from vime.gateway.constrain import Mode, forced_calls, output_schema
from vime.gateway.schema import APIError, ChatRequest
from vime.gateway.sessions import Cursor, Session, SessionStore, Turn
from vime.gateway.tools import TOOL_PARSERS
from vime.protocols import Engine, EnginePool
from vime.types import Completion, SamplingParams


@dataclass
class Prepared:
    """A turn ready for the engine: everything that can be refused has been checked."""

    req: ChatRequest
    session: Session | None
    cursor: Cursor
    mode: Mode
    params: SamplingParams
    engine: Engine
    sid: str | None


@dataclass
class Delta:
    """Text a streamed turn can hand out now, with the log-probs of the tokens sampled since the last one."""

    text: str
    logprobs: list[dict[str, Any]]


class ChatTurns:
    def __init__(self, engines: EnginePool, tokenizer: Any, cfg: GatewayConfig, store: SessionStore):
        self.engines, self.tokenizer, self.cfg, self.store = engines, tokenizer, cfg, store
        self.parse_tools = TOOL_PARSERS.get(cfg.tool_parser)
        self.markers: tuple[str, ...] = tuple(getattr(self.parse_tools, "markers", ()))
        self.marker_ids = {tokenizer.convert_tokens_to_ids(m) for m in self.markers}
        self.specials = set(tokenizer.all_special_ids)

    def decode(self, ids: list[int], tools: bool = False) -> str:
        """Special tokens skipped, but a tool request keeps its parser's markers."""
        drop = self.specials - self.marker_ids if tools else self.specials
        return str(self.tokenizer.decode([t for t in ids if t not in drop], skip_special_tokens=False))

    async def engine_for(self, key: str | None) -> Engine:
        first = self.engines.pick(key)
        for e in [first] + [e for e in self.engines.engines if e is not first]:
            if await e.healthy():
                return e
        raise APIError(503, "no healthy inference engine", "service_unavailable")

    def check_length(self, prompt_ids: list[int], max_tokens: int, param: str) -> None:
        if len(prompt_ids) + max_tokens > self.cfg.context_length:
            raise APIError(
                400,
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"context length {self.cfg.context_length}",
                param=param,
                code="context_length_exceeded",
            )

    @staticmethod
    def params_of(req: Any, max_tokens: int, schema: dict[str, Any] | None = None) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=stop,
            json_schema=schema,
        )  # fmt: skip

    def logprobs_content(self, token_ids: list[int], logprobs: list[float]) -> list[dict[str, Any]]:
        out = []
        for t, lp in zip(token_ids, logprobs):
            s = self.tokenizer.decode([t])
            out.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []})
        return out

    async def prepare(self, req: ChatRequest, sid: str | None) -> Prepared:
        mode, schema = output_schema(req)
        session = self.store.get(sid) if sid else None
        try:  # the template and tokenizer run off the event loop: a long body must not stall /health
            cursor = await asyncio.to_thread(
                lambda: (
                    self.store.prompt_for(session, req.messages, req.tools)
                    if session
                    else Cursor(self.store.builder.first_prompt(req.messages, req.tools))
                )
            )
        except Exception as e:  # noqa: BLE001 - a template that cannot render these messages
            raise APIError(400, f"cannot apply the chat template to 'messages': {e}", param="messages") from None
        # like vLLM: an unset max_tokens shrinks to what the context has left; one the client set is checked
        asked = req.max_completion_tokens or req.max_tokens
        left = self.cfg.context_length - len(cursor.ids)
        max_tokens = asked or max(1, min(self.cfg.default_max_tokens, left))
        self.check_length(cursor.ids, max_tokens, "messages")
        engine = await self.engine_for(sid)
        return Prepared(req, session, cursor, mode, self.params_of(req, max_tokens, schema), engine, sid)

    async def run(self, req: ChatRequest, sid: str | None) -> dict[str, Any]:
        """The answer as a Chat Completions body (Responses converts it)."""
        p = await self.prepare(req, sid)
        (completions,) = await p.engine.generate([p.cursor.ids], p.params, session=sid)
        return self.answer(p, completions)

    async def stream(self, p: Prepared) -> AsyncIterator[Delta | dict[str, Any]]:
        """Deltas of text as they become safe to hand out, then the whole answer (as `run` returns it)."""
        sent, n_lp = "", 0
        final: Completion | None = None
        async for c in p.engine.stream(p.cursor.ids, p.params, session=p.sid):
            if c.finish_reason:
                final = c
                break
            if p.mode == "forced":
                continue  # the answer is calls, parsed at the end
            tools = p.mode == "tools"
            text = self.decode(c.token_ids, tools=tools)
            safe = text[: self.safe_end(text, tools)]
            safe = safe.strip() if tools else safe  # the parser strips the content around a call
            if len(safe) > len(sent) and safe.startswith(sent):
                lps = self.logprobs_content(c.token_ids[n_lp:], c.logprobs[n_lp:]) if p.req.logprobs else []
                yield Delta(safe[len(sent) :], lps)
                sent, n_lp = safe, len(c.token_ids)
        if final is None:
            raise RuntimeError("the engine's stream ended without a finish reason")
        answer = self.answer(p, [final])
        content = answer["choices"][0]["message"].get("content") or ""
        if content.startswith(sent) and len(content) > len(sent):
            lps = self.logprobs_content(final.token_ids[n_lp:], final.logprobs[n_lp:]) if p.req.logprobs else []
            yield Delta(content[len(sent) :], lps)
        yield answer

    def safe_end(self, text: str, tools: bool) -> int:
        """How much of the text so far is final: not a half-decoded character, not what a tool call may start."""
        end = len(text)
        while end and text[end - 1] == "\ufffd":
            end -= 1
        if tools and self.markers:
            opening = self.markers[0]
            found = text.find(opening)
            if found >= 0:
                return min(end, found)
            for k in range(min(len(opening) - 1, end), 0, -1):
                if text[:end].endswith(opening[:k]):
                    return end - k
        return end

    def answer(self, p: Prepared, completions: list[Completion]) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(completions):
            text = self.decode(c.token_ids, tools=p.mode == "tools")
            content, calls = self.parse_tools(text) if p.mode == "tools" else (text, [])
            if p.mode == "forced":
                calls = forced_calls(text)
                content = None if calls else text
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            finish = "tool_calls" if calls else ("length" if c.finish_reason == "length" else "stop")
            choice = {"index": i, "message": message, "finish_reason": finish, "token_ids": c.token_ids}
            if p.req.logprobs:
                choice["logprobs"] = {"content": self.logprobs_content(c.token_ids, c.logprobs)}
            choices.append(choice)
            if p.session is not None and i == 0:  # a session follows its first choice
                self.record(p, c, text, message)
        prompt_ids = p.cursor.ids
        n_out = sum(len(c.token_ids) for c in completions)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": p.req.model,
            "choices": choices,
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": n_out,
                      "total_tokens": len(prompt_ids) + n_out},
            "prompt_token_ids": prompt_ids,
        }  # fmt: skip

    def record(self, p: Prepared, c: Completion, text: str, message: dict[str, Any]) -> None:
        assert p.session is not None
        turn = Turn(
            p.cursor.ids, c.token_ids, c.logprobs, c.finish_reason, c.weight_versions, text, p.engine.base_url,
            p.req.temperature,
        )  # fmt: skip
        self.store.record(p.session, p.cursor, p.req.messages, turn, message)
