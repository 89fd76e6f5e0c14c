"""OpenAI's Responses API (`/v1/responses`), what the OpenAI Agents SDK and pydantic-ai send by default.

A Responses request is translated into a Chat Completions turn and run by the same code (`run_chat`), so it gets
the same exact-token session recording; the answer is translated back into output items. `previous_response_id`
continues a stored conversation: the gateway keeps each response's messages (bounded: past the cap the oldest go first)
and its session, so a chain of responses is one session whose tokens are never re-rendered.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request

from vime.gateway.chat import ChatTurns
from vime.gateway.schema import APIError, ChatRequest, parse
from vime.gateway.stream import live, response_events


def install_responses(
    app: FastAPI,
    turns: ChatTurns,
    body_of: Callable[[Request], Awaitable[Any]],
    check_model: Any,
    keep: int,
    errors: dict[str, int],
) -> None:
    chains: OrderedDict[str, tuple[list[dict[str, Any]], str]] = OrderedDict()  # id -> (messages, session)

    @app.post("/v1/responses")
    @app.post("/sessions/{sid}/v1/responses")
    async def responses(request: Request, sid: str | None = None) -> Any:
        body = await body_of(request)
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        history: list[dict[str, Any]] = []
        prev = body.get("previous_response_id")
        if prev:
            if prev not in chains:
                raise APIError(
                    404, f"previous response {prev!r} not found", param="previous_response_id", code="not_found"
                )
            history, chained = chains[prev]
            sid = sid or chained
        rid, msg_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        session = sid or request.headers.get("x-session-id") or body.get("user") or f"chain-{rid}"
        req = parse(ChatRequest, chat_body(body, history))
        check_model(req.model)

        def finish(answer: dict[str, Any]) -> dict[str, Any]:
            chains[rid] = ([*req.messages, answer["choices"][0]["message"]], session)
            while len(chains) > keep:
                chains.popitem(last=False)
            return response_body(rid, body, answer, prev, msg_id)

        if not body.get("stream"):
            return finish(await turns.run(req, session))
        events = turns.stream(await turns.prepare(req, session))
        start = {**response_body(rid, body, empty_answer(req.model), prev, msg_id), "status": "in_progress"}
        return live(response_events(events, {**start, "usage": None}, msg_id, finish), errors, named=True)


def empty_answer(model: str) -> dict[str, Any]:
    """What a response is before anything was sampled (the `response.created` event carries it)."""
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    choice = {"message": {"content": None}, "finish_reason": "stop", "token_ids": []}
    return {"model": model, "choices": [choice], "usage": usage, "prompt_token_ids": []}


def chat_body(body: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """A Responses request as the Chat Completions request it means."""
    unsupported = [k for k in ("background", "conversation") if body.get(k)]
    if unsupported:
        raise APIError(400, f"'{unsupported[0]}' is not supported by this gateway", param=unsupported[0])
    messages = list(history)
    if body.get("instructions") and not history:
        messages.append({"role": "system", "content": body["instructions"]})
    messages += input_messages(body.get("input"))
    chat: dict[str, Any] = {
        "model": body.get("model"),
        "messages": messages,
        "user": body.get("user"),
        "seed": body.get("seed"),  # not in OpenAI's Responses; vLLM takes it, and tests want it
        "temperature": body.get("temperature") if body.get("temperature") is not None else 1.0,
        "top_p": body.get("top_p") if body.get("top_p") is not None else 1.0,
    }
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    tools = [chat_tool(t, i) for i, t in enumerate(body.get("tools") or [])]
    if tools:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is not None:
        chat["tool_choice"] = choice
    fmt = (body.get("text") or {}).get("format")
    if fmt and fmt.get("type") == "json_schema":  # Responses flattens what Chat Completions nests
        chat["response_format"] = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    elif fmt:
        chat["response_format"] = fmt
    return chat


def chat_tool(tool: Any, i: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not tool.get("name"):
        kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
        raise APIError(400, f"tools[{i}] is a {kind!r} tool; this gateway runs function tools only", param="tools")
    fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": fn}


def input_messages(items: Any) -> list[dict[str, Any]]:
    """Input items → chat messages: function calls join the assistant message before them (as the chat turn
    that made them recorded it), function outputs become tool messages, reasoning items are dropped."""
    if items is None:
        raise APIError(400, "'input' is required", param="input")
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items if isinstance(items, list) else [items]):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and item.get("role"):
            out.append({"role": item["role"], "content": item.get("content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function"}
            call["function"] = {"name": item.get("name"), "arguments": item.get("arguments", "")}
            if out and out[-1]["role"] == "assistant":  # the text and the calls of one reply are one message
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else str(output)
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        elif kind == "reasoning":
            continue
        else:
            raise APIError(400, f"input[{i}] is a {kind!r} item; this gateway takes messages and function calls")
    return out


def response_body(
    rid: str, body: dict[str, Any], answer: dict[str, Any], prev: str | None, msg_id: str
) -> dict[str, Any]:
    choice = answer["choices"][0]
    message = choice["message"]
    output: list[dict[str, Any]] = []
    if message.get("content"):
        output.append(
            {
                "type": "message",
                "id": msg_id,
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": message["content"], "annotations": []}],
            }
        )
    for call in message.get("tool_calls") or []:
        output.append(
            {
                "type": "function_call",
                "id": f"fc_{uuid.uuid4().hex}",
                "call_id": call["id"],
                "name": call["function"]["name"],
                "arguments": call["function"]["arguments"],
                "status": "completed",
            }
        )
    usage = answer["usage"]
    cut = choice["finish_reason"] == "length"
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "error": None,
        "model": answer["model"],
        "output": output,
        "instructions": body.get("instructions"),
        "previous_response_id": prev,
        "parallel_tool_calls": bool(body.get("parallel_tool_calls", True)),
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "max_output_tokens": body.get("max_output_tokens"),
        "text": body.get("text") or {"format": {"type": "text"}},
        "truncation": "disabled",
        "metadata": body.get("metadata") or {},
        "usage": {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"],
        },
        # vime's addition, as on chat: the exact ids, so a client can check what was recorded
        "prompt_token_ids": answer["prompt_token_ids"],
        "output_token_ids": choice["token_ids"],
    }
