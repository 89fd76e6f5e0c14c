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
    rest = sample.response[m.end():].strip()
    return float(int(m.group(1)) == int(sample.label) and rest == "")


def make_problems(n: int, seed: int, max_operand: int = 9) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        out.append({"prompt": f"{a}+{b}=", "label": str(a + b)})
    return out


def write_dataset(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "train.jsonl", out / "eval.jsonl")
    for path, rows in zip(paths, (make_problems(n_train, seed), make_problems(n_eval, seed + 1))):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
