"""Rollout routing replay (R3) on and off, same MoE GRPO run: `python benchmarks/moe_r3.py [--gpu]`.

Runs the MoE recipe (CPU: configs/grpo_moe_cpu.yaml, the tiny Qwen3-MoE at EP=2; --gpu: configs/grpo_moe_gpu.yaml)
once without R3 (the baseline) and once with it, same seed and steps, and compares per step the engine-vs-trainer
log-prob mismatch on the sampled tokens (`consistency/*`: the trainer's recomputed old log-probs against the
engine's) and, with R3, the share of expert choices where the trainer's live router would have picked otherwise
(`train/r3_disagree`). `--set` passes extra recipe overrides to both runs (e.g. trainer.dtype=bfloat16, whose
rounding makes routers flip where an fp32 engine did not). Writes benchmarks/results/moe_r3_<card>[_<name>].{json,png}.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("consistency/mean_abs_diff", "consistency/max_abs_diff", "train/r3_disagree", "rollout/reward")


def series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    return {k: [(r["step"], float(r[k])) for r in rows if k in r and r["step"] >= 0] for k in KEYS}


def mean(xs: list[tuple[int, float]]) -> float:
    vals = [v for _, v in xs if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--recipe", default="", help="another MoE recipe (e.g. configs/grpo_moe_gpu_sglang.yaml)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sft-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], dest="sets", help="extra recipe override (both runs)")
    ap.add_argument("--name", default="", help="suffix of the result files (a variant's label)")
    ap.add_argument("--out", default="runs/moe_r3")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import RESULTS, card_slug, exit_on_sigterm, lines_png, train_run, write

    exit_on_sigterm()
    recipe = a.recipe or ("configs/grpo_moe_gpu.yaml" if a.gpu else "configs/grpo_moe_cpu.yaml")
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [
        f"loop.num_steps={a.steps}",
        f"loop.sft_steps={a.sft_steps}",
        f"run.seed={a.seed}",
        f"rollout.seed={a.seed}",
        "loop.eval_every=0",
        *a.sets,
    ]
    runs: dict[str, dict[str, Any]] = {}
    for name, r3 in (("live routing", False), ("R3", True)):
        tag = "r3" if r3 else "live"
        r = train_run(recipe, out / tag, [*common, f"algorithm.routing_replay={str(r3).lower()}"], out / f"{tag}.log")
        s = series(r["rows"])
        runs[name] = {"rc": r["rc"], "seconds": r["seconds"], "series": s}
        print(
            f"{name:>13}: rc {r['rc']}, {r['seconds']:.0f} s, mismatch mean {mean(s[KEYS[0]]):.3e} "
            f"max {max((v for _, v in s[KEYS[1]]), default=float('nan')):.3e}, "
            f"r3 disagreement {mean(s[KEYS[2]]):.3e}",
            flush=True,
        )
    base, r3 = runs["live routing"]["series"], runs["R3"]["series"]
    ratio = mean(r3[KEYS[0]]) / max(1e-30, mean(base[KEYS[0]]))
    print(f"R3 / live routing, mean |engine - trainer| log-prob: {ratio:.3f}", flush=True)
    card = card_slug()
    name = f"moe_r3_{card}" + (f"_{a.name}" if a.name else "")
    payload = {
        "card": card,
        "recipe": recipe,
        "overrides": common,
        "baseline": "live routing",
        "mean_abs_diff_ratio_r3_vs_live": ratio,
        "runs": runs,
    }
    print("wrote", write(name, payload))
    lines_png(
        name,
        {f"{n}: mean |Δ|": v["series"][KEYS[0]] for n, v in runs.items()}
        | {f"{n}: max |Δ|": v["series"][KEYS[1]] for n, v in runs.items()},
        "engine vs trainer log-prob |Δ|",
        f"MoE GRPO with and without routing replay ({card})",
        Path(os.environ.get("VIME_BENCH_OUT", RESULTS)),
    )
    return 0 if all(v["rc"] == 0 for v in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
