"""A calculator agent written with litellm, as a framework user would write it: it offers a `multiply` tool, runs
the calls the model makes, and returns the model's last answer. vime hands it a session URL and records every
turn's exact tokens; the agent contains no vime code.

The task (products of two 2-digit numbers) is one the tiny model cannot do in its head but can do with the tool:
copy the two numbers into a call, then copy the tool's result into the answer.
"""

from __future__ import annotations

import json
import os
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price list at import

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "multiply",
            "description": "a*b",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    }
]


def multiply(arguments: str) -> str:
    try:
        args = json.loads(arguments)
        return str(int(args["a"]) * int(args["b"]))
    except (ValueError, KeyError, TypeError) as e:
        return f"error: {e}"


async def calculator_agent(base_url: str, api_key: str, task: dict[str, Any], max_turns: int = 3) -> str:
    import litellm

    messages: list[dict[str, Any]] = [{"role": "user", "content": task["prompt"]}]
    text = ""
    for _ in range(max_turns):
        r = await litellm.acompletion(
            model="openai/vime",
            api_base=base_url,
            api_key=api_key,
            messages=messages,
            tools=TOOLS,
            max_tokens=64,
            temperature=1.0,
        )
        msg = r.choices[0].message
        text = msg.content or ""
        if not msg.tool_calls:
            break
        messages.append(msg.model_dump(exclude_none=True))
        for call in msg.tool_calls:
            result = multiply(call.function.arguments) if call.function.name == "multiply" else "unknown tool"
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return text
