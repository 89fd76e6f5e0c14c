"""Turn a GPU GRPO run's metrics.jsonl into the benchmark record: per-step time split (rollout / train / weight
sync) and the bf16 train-inference log-prob mismatch, as JSON + PNG under $VIME_BENCH_OUT.
`python benchmarks/gpu_grpo_report.py runs/grpo_gpu NAME`"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write


def main(run_dir: str, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 1 and "time/rollout" in r]
    keys = (
        "time/rollout",
        "time/train",
        "time/weight_sync",
        "consistency/mean_abs_diff",
        "consistency/max_abs_diff",
        "sync/push_s",
        "rollout/reward",
        "rollout/tokens_per_s",
        "memory/engine_sleep_freed_gb",
        "sync/memory/engine_wake_used_gb",
    )
    per_step = [{"step": r["step"], **{k: r[k] for k in keys if k in r}} for r in steps]
    mean = {k: sum(s[k] for s in per_step if k in s) / max(1, sum(k in s for s in per_step)) for k in keys}
    evals = [(r["step"], r["eval/reward"]) for r in rows if "eval/reward" in r]
    out = Path(os.environ.get("VIME_BENCH_OUT", Path(__file__).resolve().parent / "results"))
    write(
        name,
        {
            "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "run": run_dir,
            "steps": len(per_step),
            "mean": mean,
            "eval": evals,
            "per_step": per_step,
        },
        out,
    )
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    x = [s["step"] for s in per_step]
    bottom = [0.0] * len(x)
    for k in ("time/rollout", "time/train", "time/weight_sync"):
        v = [s.get(k, 0.0) for s in per_step]
        a.bar(x, v, bottom=bottom, label=k.split("/")[1])
        bottom = [p + q for p, q in zip(bottom, v)]
    a.set_xlabel("step"), a.set_ylabel("seconds"), a.legend(fontsize=8), a.set_title("GRPO step time split")
    b.plot(x, [s.get("consistency/mean_abs_diff", 0) for s in per_step], label="mean |Δ logp|")
    b.plot(x, [s.get("consistency/max_abs_diff", 0) for s in per_step], label="max |Δ logp|")
    b.set_yscale("log"), b.set_xlabel("step"), b.legend(fontsize=8), b.set_title("engine vs trainer (bf16)")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    print(json.dumps(mean, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
