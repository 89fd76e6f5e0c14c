"""What a chat request constrains the answer to, as one JSON schema the engine decodes under (its structured
output): `tool_choice: required` or a named function (the answer is a list of calls, parsed as JSON rather than by
the tool parser, as vLLM does), and `response_format` JSON. The decoding constraint covers the whole answer, so
a JSON response_format on an `auto` turn leaves no room for a tool call (as in vLLM), and on a forced turn it has
nothing to shape (a call has no content). Anything the gateway cannot honour is a 400 that says
so: ignoring it would hand the agent an answer it did not ask for."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from vime.gateway.schema import APIError, ChatRequest

Mode = Literal["text", "tools", "forced", "json"]  # plain; tool calls parsed from text; forced calls; JSON content


def output_schema(req: ChatRequest) -> tuple[Mode, dict[str, Any] | None]:
    if req.top_logprobs:
        raise APIError(
            400,
            "top_logprobs > 0 cannot be honoured: the engines return the sampled token's log-prob only (logprobs: "
            "true gives it)",
            param="top_logprobs",
        )
    fmt = response_schema(req.response_format)
    choice = req.tool_choice
    if choice in (None, "auto", "none"):
        if fmt is not None:
            return "json", fmt
        return ("tools" if req.tools and choice != "none" else "text"), None
    return "forced", calls_schema(req.tools or [], choice)  # a call has no content for a response_format to shape


def response_schema(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = (fmt or {}).get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return schema
        raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
    raise APIError(400, f"response_format type {kind!r} is not one of text, json_object, json_schema")


def calls_schema(tools: list[dict[str, Any]], choice: Any) -> dict[str, Any]:
    """`required`: one or more calls of any tool; a named function: exactly that one."""
    fns = [t.get("function") or {} for t in tools]
    if choice == "required":
        if not fns:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
        items = [call_schema(f) for f in fns]
        return {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    name = ((choice or {}).get("function") or {}).get("name") if isinstance(choice, dict) else None
    named = [f for f in fns if f.get("name") == name]
    if not named:
        known = ", ".join(str(f.get("name")) for f in fns) or "none"
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools ({known})", param="tool_choice")
    return {"type": "array", "minItems": 1, "maxItems": 1, "items": call_schema(named[0])}


def call_schema(fn: dict[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [fn.get("name")]}, "arguments": params},
        "required": ["name", "arguments"],
    }


def forced_calls(text: str) -> list[dict[str, Any]]:
    """The calls of a forced answer (a JSON list); none when it was cut short (finish_reason length)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:12]}",
            "type": "function",
            "function": {"name": str(c["name"]), "arguments": json.dumps(c.get("arguments", {}))},
        }
        for c in items
        if isinstance(items, list) and isinstance(c, dict) and "name" in c
    ]
