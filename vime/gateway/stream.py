"""OpenAI's server-sent-event streams: the chunk protocol of Chat Completions and the event protocol of Responses,
written as the engine samples (`ChatTurns.stream`, `completion_chunks`); several prompts or choices (n > 1) go out
from the finished answer."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from vime.gateway.chat import Delta
from vime.gateway.schema import APIError
from vime.types import Completion

Chunks = AsyncIterator[dict[str, Any]]


def sse(chunks: list[dict[str, Any]]) -> StreamingResponse:
    async def gen() -> Any:
        for c in chunks:
            yield f"data: {json.dumps(c)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


def live(chunks: Chunks, errors: dict[str, int], named: bool = False) -> StreamingResponse:
    """Events as they are made. A failure after the headers went out can only be an error event (the client
    libraries raise on one); it is counted as the 5xx it would otherwise have been."""

    def line(e: dict[str, Any]) -> str:
        return (f"event: {e['type']}\n" if named else "") + f"data: {json.dumps(e)}\n\n"

    async def gen() -> Any:
        try:
            async for c in chunks:
                yield line(c)
        except Exception as e:  # noqa: BLE001 - whatever failed, the client must hear of it
            errors["5xx"] = errors.get("5xx", 0) + 1
            message = e.message if isinstance(e, APIError) else f"{type(e).__name__}: {e}"
            err = {"message": message, "type": "server_error", "param": None, "code": None}
            yield line({"type": "error", **err, "error": err})
        if not named:
            yield "data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


def chunk(
    base: dict[str, Any], i: int, delta: dict[str, Any], finish: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {**base, "choices": [{"index": i, "delta": delta, "finish_reason": finish, **extra}]}


def closing(base: dict[str, Any], choice: dict[str, Any]) -> list[dict[str, Any]]:
    """Tool calls, then the finish reason (with the exact sampled ids, vime's addition as on the whole answer)."""
    i, calls = choice["index"], choice["message"].get("tool_calls")
    out = [chunk(base, i, {"tool_calls": [{"index": k, **tc} for k, tc in enumerate(calls)]})] if calls else []
    return [*out, chunk(base, i, {}, choice["finish_reason"], token_ids=choice["token_ids"])]


def stream_chat(resp: dict[str, Any]) -> StreamingResponse:
    """OpenAI chunk protocol over a finished completion (n > 1): role, content, tool calls, finish reason."""
    base = {"id": resp["id"], "object": "chat.completion.chunk", "created": resp["created"], "model": resp["model"]}
    chunks = []
    for ch in resp["choices"]:
        i, content = ch["index"], ch["message"].get("content")
        chunks.append(chunk(base, i, {"role": "assistant", "content": ""}))
        if content:
            chunks.append(chunk(base, i, {"content": content}, logprobs=ch.get("logprobs")))
        chunks += closing(base, ch)
    return sse([*chunks, {**base, "choices": [], "usage": resp["usage"]}])


async def chat_chunks(events: AsyncIterator[Delta | dict[str, Any]], model: str) -> Chunks:
    """OpenAI chunk protocol as the engine samples: role, a content chunk per delta, then the parsed ending."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time())}
    base["model"] = model
    yield chunk(base, 0, {"role": "assistant", "content": ""})
    async for e in events:
        if isinstance(e, Delta):
            yield chunk(base, 0, {"content": e.text}, logprobs={"content": e.logprobs} if e.logprobs else None)
            continue
        for c in closing(base, e["choices"][0]):
            yield c
        yield {**base, "choices": [], "usage": e["usage"], "prompt_token_ids": e["prompt_token_ids"]}


def stream_chat_live(events: AsyncIterator[Delta | dict[str, Any]], model: str, errors: dict[str, int]) -> Any:
    return live(chat_chunks(events, model), errors)


async def completion_chunks(
    pieces: AsyncIterator[Completion], decode: Callable[[list[int]], str], model: str, logprobs: bool
) -> Chunks:
    """Completions' chunks as the engine samples one prompt: new text (never half a character), and on the last
    the finish reason with the exact sampled ids."""
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model}
    sent, n = "", 0
    async for c in pieces:
        text = decode(c.token_ids)
        safe = text if c.finish_reason else text.rstrip("\ufffd")
        delta = safe[len(sent) :] if safe.startswith(sent) else ""
        if not delta and not c.finish_reason:
            continue
        choice: dict[str, Any] = {"index": 0, "text": delta, "finish_reason": None, "logprobs": None}
        if logprobs:
            toks = [decode([t]) for t in c.token_ids[n:]]
            choice["logprobs"] = {"tokens": toks, "token_logprobs": c.logprobs[n:], "top_logprobs": None}
        if c.finish_reason:
            choice |= {"finish_reason": "length" if c.finish_reason == "length" else "stop", "token_ids": c.token_ids}
        yield {**base, "choices": [choice]}
        sent, n = safe, len(c.token_ids)


def stream_completion(resp: dict[str, Any]) -> StreamingResponse:
    chunks = [
        {
            **{k: resp[k] for k in ("id", "object", "created", "model")},
            "choices": [
                {"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": c["logprobs"]}
            ],
        }
        for c in resp["choices"]
    ]
    return sse(chunks)


async def response_events(
    events: AsyncIterator[Delta | dict[str, Any]],
    start: dict[str, Any],
    msg_id: str,
    finish: Callable[[dict[str, Any]], dict[str, Any]],
) -> Chunks:
    """The Responses event protocol as the engine samples: created; the message item opened at the first text
    and a delta per piece; at the end each output item done (calls whole, as the parser finds them at the end),
    then completed with the whole response, which clients keep. `finish` turns the chat answer into it."""
    seq = iter(range(1 << 30))

    def ev(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "sequence_number": next(seq), **fields}

    def opening(i: int, item: dict[str, Any]) -> list[dict[str, Any]]:
        if item["type"] != "message":
            added = ev(
                "response.output_item.added", output_index=i, item={**item, "status": "in_progress", "arguments": ""}
            )
            return [
                added,
                ev(
                    "response.function_call_arguments.delta",
                    output_index=i,
                    item_id=item["id"],
                    delta=item["arguments"],
                ),
            ]
        added = ev("response.output_item.added", output_index=i, item={**item, "status": "in_progress", "content": []})
        part = {"type": "output_text", "text": "", "annotations": []}
        return [
            added,
            ev("response.content_part.added", output_index=i, item_id=item["id"], content_index=0, part=part),
        ]

    yield ev("response.created", response=start)
    yield ev("response.in_progress", response=start)
    sent = ""
    message = {"type": "message", "id": msg_id, "role": "assistant", "content": []}
    async for e in events:
        if isinstance(e, Delta):
            for x in opening(0, message) if not sent else []:
                yield x
            yield ev(
                "response.output_text.delta", output_index=0, item_id=msg_id, content_index=0, delta=e.text, logprobs=[]
            )
            sent += e.text
            continue
        resp = finish(e)
        for i, item in enumerate(resp["output"]):
            ref = {"output_index": i, "item_id": item["id"]}
            if item["type"] == "message":
                part = item["content"][0]
                for x in opening(i, item) if not sent else []:
                    yield x
                rest = part["text"][len(sent) :] if part["text"].startswith(sent) else ""
                if rest:
                    yield ev("response.output_text.delta", **ref, content_index=0, delta=rest, logprobs=[])
                yield ev("response.output_text.done", **ref, content_index=0, text=part["text"], logprobs=[])
                yield ev("response.content_part.done", **ref, content_index=0, part=part)
            else:
                for x in opening(i, item):
                    yield x
                yield ev("response.function_call_arguments.done", **ref, arguments=item["arguments"])
            yield ev("response.output_item.done", output_index=i, item=item)
        done = "response.completed" if resp["status"] == "completed" else "response.incomplete"
        yield ev(done, response=resp)
