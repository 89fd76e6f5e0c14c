"""Writes the tool task's data: `python -m examples.tool_calc.make_data` (deterministic).

train.jsonl / eval.jsonl: prompts "What is 37*48?" with the product as label (eval pairs never in train);
sft.jsonl: for a slice of the training pairs, agent conversations in the format `loop.sft_path` takes (messages +
tools). Half call multiply, read the result and answer with it; half answer from the head with the estimate a
person would make (37*48 -> 40*50 = 2000), as a model that knows the tool but does not always reach for it would.
The warm-started model so calls its tool about half the time, and what RL has to learn is that the calls pay.
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


def guess(a: int, b: int) -> dict:
    estimate = round(a, -1) * round(b, -1)
    return {
        "messages": [
            {"role": "user", "content": f"What is {a}*{b}?"},
            {"role": "assistant", "content": str(estimate)},
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
    write("sft.jsonl", [guess(a, b) if i % 2 else trace(a, b) for i, (a, b) in enumerate(train[:1000])])


if __name__ == "__main__":
    main()
