"""The algorithm recipes side by side on the default CPU task: `python benchmarks/compare_recipes.py`.

Runs `vime train` once per recipe (same model, data, seed and step count; only the algorithm differs), reads each
run's eval reward by step, and writes one plot and one JSON (benchmarks/results/compare_recipes_cpu.*). The
baseline in the same run is GRPO: every other recipe's final eval reward and wall time are printed as a ratio to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(recipe: str, out: Path, steps: int, seed: int) -> dict:
    from benchmarks.common import train_run

    sets = [f"loop.num_steps={steps}", f"run.seed={seed}", f"rollout.seed={seed}"]
    r = train_run(f"configs/{recipe}_tiny_cpu.yaml", out, sets, out.parent / f"{recipe}.log")
    return {"recipe": recipe, "rc": r["rc"], "seconds": r["seconds"], "eval": r["eval"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["grpo", "dapo", "ppo", "dr_grpo", "rloo"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/compare")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import lines_png, write

    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for recipe in a.recipes:
        r = run(recipe, out / recipe, a.steps, a.seed)
        rows.append(r)
        last = r["eval"][-1][1] if r["eval"] else float("nan")
        print(f"{recipe:>30}: rc {r['rc']}, final eval reward {last:.3f}, {r['seconds']:.0f} s", flush=True)
    base = rows[0]
    for r in rows:
        if r["eval"] and base["eval"]:
            r["final_eval"] = r["eval"][-1][1]
            r["final_eval_vs_" + base["recipe"]] = r["final_eval"] / max(1e-9, base["eval"][-1][1])
            r["seconds_vs_" + base["recipe"]] = r["seconds"] / base["seconds"]
            print(
                f"{r['recipe']:>30}: eval {r['final_eval_vs_' + base['recipe']]:.2f}x, time "
                f"{r['seconds_vs_' + base['recipe']]:.2f}x of {base['recipe']}",
                flush=True,
            )
    results = ROOT / "benchmarks" / "results"
    payload = {
        "card": "CPU (no accelerator)",
        "steps": a.steps,
        "seed": a.seed,
        "baseline": base["recipe"],
        "runs": rows,
    }
    print("wrote", write("compare_recipes_cpu", payload, results))
    lines_png(
        "compare_recipes_cpu",
        {r["recipe"]: r["eval"] for r in rows},
        "eval reward",
        f"recipes on the CPU arithmetic task (seed {a.seed})",
        results,
    )
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
