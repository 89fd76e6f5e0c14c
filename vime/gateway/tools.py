"""Tool-call parsers: model text → OpenAI `tool_calls`. Pluggable by import path (`gateway.tool_parser`).

A parser may name its `markers`: tokens the gateway keeps when it decodes a tool request's sampled ids. Tokenizers
often mark them special (Qwen's `<tool_call>`), and decoding with special tokens skipped would hand the parser a
call it can no longer find."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from vime.registry import Registry

_HERMES = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def hermes(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes/Qwen style). Malformed JSON is
    left in the content rather than guessed at."""
    calls = []
    for m in _HERMES.finditer(text):
        try:
            obj = json.loads(m.group(1))
            name, args = obj["name"], obj.get("arguments", {})
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:12]}",
                "type": "function",
                "function": {"name": str(name), "arguments": args if isinstance(args, str) else json.dumps(args)},
            }
        )
    if not calls:
        return text, []
    content = _HERMES.sub("", text).strip()
    return content or None, calls


hermes.markers = ("<tool_call>", "</tool_call>")  # type: ignore[attr-defined]  # kept when decoding (see app.py)

TOOL_PARSERS: Registry[Callable[[str], tuple[str | None, list[dict[str, Any]]]]] = Registry(
    "tool parser", "gateway.tool_parser", {"hermes": hermes}, n_args=1
)
