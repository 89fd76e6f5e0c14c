"""Writes the tool task's data: `python -m examples.tool_calc.make_data` (deterministic).

train.jsonl / eval.jsonl: prompts "What is 37*48?" with the product as label (eval pairs never in train);
sft.jsonl: for a slice of the training pairs, the conversation an agent that uses its tool has, in the format
`loop.sft_path` takes (messages + tools): call multiply, read the result, answer with it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from examples.tool_calc.agent import TOOLS

HERE = Path(__file__).parent


def trace(a: int, b: int) -> dict:
    call = {"id": "call_0", "type": "function", "function": {"name": "multiply", "arguments": {"a": a, "b": b}}}
    return {
        "messages": [
            {"role": "user", "content": f"What is {a}*{b}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": str(a * b)},
            {"role": "assistant", "content": str(a * b)},
        ],
        "tools": TOOLS,
    }


def main() -> None:
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(0).shuffle(pairs)
    evals, train = pairs[:200], pairs[200:]

    def write(name: str, rows: list[dict]) -> None:
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("train.jsonl", [{"prompt": f"What is {a}*{b}?", "label": str(a * b)} for a, b in train])
    write("eval.jsonl", [{"prompt": f"What is {a}*{b}?", "label": str(a * b)} for a, b in evals])
    write("sft.jsonl", [trace(a, b) for a, b in train[:1000]])


if __name__ == "__main__":
    main()
