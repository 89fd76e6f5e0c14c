"""The GPU GRPO recipe (lr 2e-6, 5 warm-up steps) on each engine, side by side, from committed device runs:
`python benchmarks/engines_recipe.py`.

vLLM's run is variant `a` of benchmarks/results/grpo_gpu_lr_h200.json (device_run.sh variants), SGLang's is
benchmarks/results/engines_grpo_sglang_lr2e-6_h200.json (device_run.sh sglang, PARTS=grpo ENGINES=sglang): the same
recipe, model, data and card type (H200), two device runs (one device call holds one engine's run). Prints each
engine's rollout reward over the first and last six steps, eval reward and engine-vs-trainer log-prob mismatch;
writes benchmarks/results/engines_recipe_h200.{json,png}.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summary(steps: list[dict], evals: list[list[float]]) -> dict:
    reward = [s["rollout/reward"] for s in steps]
    mm = [s["consistency/mean_abs_diff"] for s in steps]
    return {
        "steps": len(steps),
        "reward_first6": statistics.mean(reward[:6]),
        "reward_last6": statistics.mean(reward[-6:]),
        "eval": evals,
        "mismatch_mean": statistics.mean(mm),
        "mismatch_worst_step": max(mm),  # the variants run kept only the per-step mean
        "series": {
            "reward": [[s["step"], s["rollout/reward"]] for s in steps],
            "mismatch": [[s["step"], m] for s, m in zip(steps, mm)],
        },
    }


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import RESULTS, lines_png, write

    v = json.loads((RESULTS / "grpo_gpu_lr_h200.json").read_text())["variants"]["a"]
    s_path = RESULTS / "engines_grpo_sglang_lr2e-6_h200.json"
    s = json.loads(s_path.read_text())["runs"]["sglang"]
    s_eval = [
        [r["step"], r["eval/reward"]]
        for r in map(json.loads, (RESULTS / "engines_grpo_sglang_lr2e-6_h200_metrics.jsonl").read_text().splitlines())
        if "eval/reward" in r
    ]
    runs = {"vllm": summary(v["steps"], v["eval"]), "sglang": summary(s["steps"], s_eval)}
    for name, r in runs.items():
        print(
            f"{name:>6}: rollout reward {r['reward_first6']:.3f} -> {r['reward_last6']:.3f}, eval {r['eval']}, "
            f"log-prob mismatch mean {r['mismatch_mean']:.4f} (worst step {r['mismatch_worst_step']:.4f})"
        )
    ratio = runs["sglang"]["reward_last6"] / runs["vllm"]["reward_last6"]
    print(f"SGLang / vLLM, rollout reward over the last six steps: {ratio:.2f}")
    payload = {"card": "h200", "baseline": "vllm", "sglang_vs_vllm_reward_last6": ratio, "runs": runs}
    print("wrote", write("engines_recipe_h200", payload, RESULTS))
    lines_png(
        "engines_recipe_h200",
        {f"{n}: rollout reward": r["series"]["reward"] for n, r in runs.items()},
        "rollout reward",
        "GRPO recipe (lr 2e-6, warm-up 5) on each engine, H200",
        RESULTS,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
