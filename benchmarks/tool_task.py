"""The tool task, learned on CPU through the OpenAI gateway: `python benchmarks/tool_task.py`.

Runs `vime train -c configs/tool_calc_cpu.yaml` for each seed (a litellm agent, unchanged, calls the gateway; a
warm start on agent traces, half of which guess instead of calling, then GRPO on the recorded sessions). The
baseline in the same run is each seed's own step-0 eval: the warm-started model before any RL. Prints held-out
success before and after RL, its ratio and when each eval ran, and writes benchmarks/results/tool_task_cpu.json +
.png (success vs RL step, one line per seed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/tool_calc_cpu.yaml"


def run(seed: int, out: Path, steps: int | None, extra: list[str]) -> dict:
    from benchmarks.common import train_run

    sets = [f"run.seed={seed}", f"rollout.seed={seed}", f"data.seed={seed}", *extra]
    sets += [f"loop.num_steps={steps}"] if steps is not None else []
    r = train_run(RECIPE, out, sets, out.parent / f"seed{seed}.log")
    errors = sum(x.get("gateway/http_4xx", 0.0) for x in r["rows"])
    walls = eval_walls(out, r["started"]) if r["rc"] == 0 else []
    return {
        "seed": seed, "rc": r["rc"], "seconds": r["seconds"], "eval": r["eval"], "eval_at_s": walls, "http_4xx": errors,
    }  # fmt: skip


def eval_walls(run_dir: Path, started: float) -> list[list[float]]:
    """[RL step, seconds since the run was launched] of each held-out eval, from tensorboard's event times: the
    budget ("within 10 minutes") counts the warm start and the start-up too."""
    from benchmarks.common import scalar_walls

    return [[step, round(wall - started, 1)] for step, wall in scalar_walls(run_dir, "eval/reward")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="RL steps (default: the recipe's)")
    ap.add_argument("--out", default="runs/tool_task")
    ap.add_argument("--set", action="append", default=[], help="recipe override, as vime train --set")
    ap.add_argument("--name", default="tool_task_cpu", help="results file name under benchmarks/results/")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import lines_png, write

    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in a.seeds:
        r = run(seed, out / f"seed{seed}", a.steps, a.set)
        if r["eval"]:
            r["before_rl"], r["after_rl"] = r["eval"][0][1], r["eval"][-1][1]
            r["after_vs_before"] = r["after_rl"] / max(1e-9, r["before_rl"])
            print(
                f"seed {seed}: rc {r['rc']}, held-out success {r['before_rl']:.3f} -> {r['after_rl']:.3f} "
                f"({r['after_vs_before']:.2f}x the warm-started baseline), {r['seconds']:.0f} s; evals at "
                + ", ".join(f"step {k}: {t:.0f} s" for k, t in r["eval_at_s"]),
                flush=True,
            )
        else:
            print(f"seed {seed}: rc {r['rc']} (see {out / f'seed{seed}.log'})", flush=True)
        rows.append(r)
    results = ROOT / "benchmarks" / "results"
    payload = {
        "card": "CPU (no accelerator)",
        "recipe": RECIPE,
        "overrides": a.set,
        "baseline": "step-0 eval (after SFT)",
        "runs": rows,
    }
    print("wrote", write(a.name, payload, results))
    lines_png(
        a.name,
        {f"seed {r['seed']}": r["eval"] for r in rows},
        "held-out success",
        "tool task through the gateway (litellm agent, CPU)",
        results,
    )
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
