"""OpenAI's server-sent-event streams, written from a finished answer (the engine call returns whole
completions): the chunk protocol of Chat Completions and Completions, and the event protocol of Responses."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import StreamingResponse


def sse(chunks: list[dict[str, Any]]) -> StreamingResponse:
    async def gen() -> Any:
        for c in chunks:
            yield f"data: {json.dumps(c)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


def stream_chat(resp: dict[str, Any]) -> StreamingResponse:
    """OpenAI chunk protocol over a finished completion: role, content, tool calls, then the finish reason."""
    base = {"id": resp["id"], "object": "chat.completion.chunk", "created": resp["created"], "model": resp["model"]}
    chunks = []
    for ch in resp["choices"]:
        i, msg = ch["index"], ch["message"]
        chunks.append(
            {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        )
        if msg.get("content"):
            chunks.append(
                {
                    **base,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"content": msg["content"]},
                            "logprobs": ch.get("logprobs"),
                            "finish_reason": None,
                        }
                    ],
                }
            )
        if msg.get("tool_calls"):
            calls = [{"index": k, **tc} for k, tc in enumerate(msg["tool_calls"])]
            chunks.append({**base, "choices": [{"index": i, "delta": {"tool_calls": calls}, "finish_reason": None}]})
        chunks.append({**base, "choices": [{"index": i, "delta": {}, "finish_reason": ch["finish_reason"]}]})
    chunks.append({**base, "choices": [], "usage": resp["usage"]})
    return sse(chunks)


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


def stream_response(resp: dict[str, Any]) -> StreamingResponse:
    """The Responses event protocol over a finished response: created, each output item added with its text or
    arguments as one delta and done, then completed (with the whole response, which clients keep)."""
    events: list[dict[str, Any]] = []

    def emit(kind: str, **fields: Any) -> None:
        events.append({"type": kind, "sequence_number": len(events), **fields})

    start = {**resp, "status": "in_progress", "output": [], "usage": None}
    emit("response.created", response=start)
    emit("response.in_progress", response=start)
    for i, item in enumerate(resp["output"]):
        ref = {"output_index": i, "item_id": item["id"]}
        if item["type"] == "message":
            emit("response.output_item.added", output_index=i, item={**item, "status": "in_progress", "content": []})
            part = item["content"][0]
            emit("response.content_part.added", **ref, content_index=0, part={**part, "text": ""})
            emit("response.output_text.delta", **ref, content_index=0, delta=part["text"], logprobs=[])
            emit("response.output_text.done", **ref, content_index=0, text=part["text"], logprobs=[])
            emit("response.content_part.done", **ref, content_index=0, part=part)
        else:
            emit("response.output_item.added", output_index=i, item={**item, "status": "in_progress", "arguments": ""})
            emit("response.function_call_arguments.delta", **ref, delta=item["arguments"])
            emit("response.function_call_arguments.done", **ref, arguments=item["arguments"])
        emit("response.output_item.done", output_index=i, item=item)
    emit("response.completed" if resp["status"] == "completed" else "response.incomplete", response=resp)

    async def gen() -> Any:
        for e in events:
            yield f"event: {e['type']}\ndata: {json.dumps(e)}\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")
