"""A multi-turn calculator-tool agent, written the way an agent framework would: plain `openai` client calls
against whatever `base_url` it is given. vime hands each run its own session URL and records every turn's exact
token ids; the agent contains no vime code."""

from __future__ import annotations

import json
from typing import Any

import openai

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    }
]


def run_tool(name: str, arguments: str) -> str:
    try:
        args = json.loads(arguments)
        if name == "add":
            return str(int(args["a"]) + int(args["b"]))
        return f"unknown tool {name}"
    except (ValueError, KeyError, TypeError) as e:
        return f"error: {e}"


async def calculator_agent(base_url: str, api_key: str, task: dict[str, Any], max_turns: int = 3) -> str:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    messages: list[dict[str, Any]] = [{"role": "user", "content": task["prompt"]}]
    text = ""
    for _ in range(max_turns):
        r = await client.chat.completions.create(
            model="vime", messages=messages, tools=TOOLS, max_tokens=24, temperature=1.0
        )
        msg = r.choices[0].message
        text = msg.content or ""
        if not msg.tool_calls:
            break
        messages.append(
            {"role": "assistant", "content": msg.content, "tool_calls": [tc.model_dump() for tc in msg.tool_calls]}
        )
        for tc in msg.tool_calls:
            messages.append(
                {"role": "tool", "tool_call_id": tc.id, "content": run_tool(tc.function.name, tc.function.arguments)}
            )
    await client.close()
    return text
