"""The toy task the tiny-model recipe trains on: small additions with an exact-answer verifier.

Small enough that a ~1M-parameter model learns it on 2 CPU cores in minutes, hard enough that a random model
scores ~0, so a rising reward means learning.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from vime.types import Sample

_INT = re.compile(r"^\s*(-?\d+)")


def arithmetic_reward(sample: Sample) -> float:
    """1 if the response starts with exactly the right integer (and nothing but whitespace follows it)."""
    m = _INT.match(sample.response)
    if not m or sample.label is None:
        return 0.0
    rest = sample.response[m.end() :].strip()
    return float(int(m.group(1)) == int(sample.label) and rest == "")


def make_problems(n: int, seed: int, max_operand: int = 9) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        out.append({"prompt": f"{a}+{b}=", "label": str(a + b)})
    return out


def write_dataset(
    out_dir: str | Path, max_operand: int = 19, eval_fraction: float = 0.2, seed: int = 0
) -> tuple[Path, Path]:
    """Every pair a+b with 0 <= a, b <= max_operand, split into train and a held-out eval set (no pair in both),
    so the eval reward measures addition, not memorised answers."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(pairs)
    n_eval = int(len(pairs) * eval_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "train.jsonl", out / "eval.jsonl")
    for path, rows in zip(paths, (pairs[n_eval:], pairs[:n_eval])):
        path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "label": str(a + b)}) + "\n" for a, b in rows))
    return paths
