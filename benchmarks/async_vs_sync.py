"""Async vs sync on one recipe and one sample budget: `python benchmarks/async_vs_sync.py [--gpu]`.

Runs `vime train` twice on one recipe, the same seed, steps and samples per step (no group filter, so both train on
exactly batch_size x n_samples samples a step): `loop.mode: sync` (the baseline, in the same run) and
`loop.mode: async` with `max_staleness` 1. CPU: configs/grpo_tiny_cpu.yaml, on 2 cores the engine bound to core 1
(`VLLM_CPU_OMP_THREADS_BIND`) and the trainer on one thread, in both runs. `--gpu`: configs/grpo_2gpu_nccl.yaml
(trainer GPU 0, engine GPU 1, NCCL pushes; `--set model.path=...`). Step time is measured from tensorboard's
event times (wall clock between consecutive steps), so it counts everything a step waits for. Prints the speed-up,
async's step time against max(rollout, train + push) of the sync run (the goal: <= 1.1x), the staleness
distribution and the eval reward after the same number of samples; writes benchmarks/results/async_vs_sync_<card>
.json + .png.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINNED = ["engine.env={VLLM_CPU_OMP_THREADS_BIND: '1'}", "trainer.threads=1", "placement.colocate=false"]
ASYNC = ["loop.mode=async", "loop.max_staleness=1", "algorithm.old_logprobs=rollout"]


def run(mode: str, recipe: str, out: Path, steps: int, seed: int, extra: list[str]) -> dict:
    from benchmarks.common import scalar_walls, train_run

    sets = [f"loop.num_steps={steps}", "loop.eval_every=0", "rollout.group_filters=[]", f"run.seed={seed}"]
    sets += [f"rollout.seed={seed}", f"data.seed={seed}", *extra, *(ASYNC if mode == "async" else [])]
    r = train_run(recipe, out, sets, out.parent / f"{mode}.log")
    rows = [x for x in r["rows"] if "train/samples" in x]
    walls = [w for _, w in scalar_walls(out, "train/samples")] if r["rc"] == 0 else []  # one per RL step
    gaps = [b - a for a, b in itertools.pairwise(walls)]

    def mean(key: str, missing: float | None = None) -> float:
        """Over the steps after the first; `missing`: the value of a step that did not log it (a histogram bin)."""
        vals = [x.get(key, missing) for x in rows[1:]]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    lags = {k: mean(k, 0.0) for k in sorted({k for x in rows for k in x if k.startswith("staleness/frac_")})}
    return {
        "mode": mode, "rc": r["rc"], "seconds": r["seconds"], "eval": r["eval"],
        "step_s": statistics.median(gaps) if gaps else float("nan"),
        "rollout_s": mean("time/rollout"), "train_s": mean("time/train"), "push_s": mean("time/weight_sync"),
        "wait_s": mean("time/wait_for_batch"), "samples_per_step": mean("train/samples"), "staleness": lags,
        "spanning_push_frac": mean("staleness/spanning_push_frac"),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/async_vs_sync")
    ap.add_argument("--gpu", action="store_true", help="two GPUs: configs/grpo_2gpu_nccl.yaml")
    ap.add_argument("--set", action="append", default=[], help="recipe override for both runs, as vime train --set")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import bar_png, machine, write

    recipe = "configs/grpo_2gpu_nccl.yaml" if a.gpu else "configs/grpo_tiny_cpu.yaml"
    extra = a.set if a.gpu else [*PINNED, *a.set]
    if a.gpu:
        m = machine()
        n, gpu = m.get("gpu_count", 0), m.get("gpu", "?")
        where = (
            "trainer GPU 0, engine GPU 1, NCCL pushes"
            if n > 1
            else "trainer and engine share the one GPU (split placement, half each; --set overrides)"
        )
        card = f"{n}x {gpu}: {where}"
        name = f"async_vs_sync_{n}x{gpu.split()[-1]}".lower()
    else:
        card, name = "CPU (no accelerator), 2 cores: engine bound to core 1, trainer 1 thread", "async_vs_sync_cpu"
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sync, asyn = (run(m, recipe, out / m, a.steps, a.seed, extra) for m in ("sync", "async"))
    bound = max(sync["rollout_s"], sync["train_s"] + sync["push_s"])
    result = {
        "speedup": sync["step_s"] / asyn["step_s"],
        "async_step_vs_sync_max_phase": asyn["step_s"] / bound,
        "goal": "async step <= 1.1 x max(rollout, train + push) of the sync run",
        "eval_after_equal_samples": {"sync": sync["eval"][-1][1], "async": asyn["eval"][-1][1]},
    }
    for r in (sync, asyn):
        print(
            f"{r['mode']:>5}: rc {r['rc']}, step {r['step_s']:.3f} s (rollout {r['rollout_s']:.3f}, train "
            f"{r['train_s']:.3f}, push {r['push_s']:.3f}, wait {r['wait_s']:.3f}), {r['samples_per_step']:.0f} "
            f"samples/step, final eval {r['eval'][-1][1] if r['eval'] else float('nan'):.3f}, "
            f"staleness {r['staleness']}",
            flush=True,
        )
    print(
        f"async {result['speedup']:.2f}x the sync step rate; async step = {result['async_step_vs_sync_max_phase']:.2f}"
        " x max(rollout, train + push) of sync (goal <= 1.1)",
        flush=True,
    )
    results = None  # benchmarks/results/, or $VIME_BENCH_OUT on the device
    payload = {
        "card": card, "recipe": recipe, "overrides": extra, "steps": a.steps, "seed": a.seed,
        "baseline": "sync (loop.mode: sync), same run",
        "runs": [sync, asyn], **result,
    }  # fmt: skip
    print("wrote", write(name, payload, results))
    bar_png(
        name,
        ["sync step", "sync rollout", "sync train+push", "async step"],
        [sync["step_s"], sync["rollout_s"], sync["train_s"] + sync["push_s"], asyn["step_s"]],
        "seconds",
        f"{Path(recipe).stem}, {card.split(':')[0]}: async {result['speedup']:.2f}x sync",
        results,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
