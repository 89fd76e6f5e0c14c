"""Delta weight pushes on a real GRPO run (CPU, gloo): `python benchmarks/bench_delta.py [--steps 20]`.

Runs `vime train` on the default CPU recipe twice per regime, with `weights.delta` on and off (same seed, model,
data and steps), and reads every push's stats from metrics.jsonl: the fraction of elements whose bits changed,
the bytes on the wire against a full push, and the push time (the full-push run is the baseline, in the same run).
Regimes: the CPU recipe as it is (float32, lr 5e-4: Adam moves nearly every float32 weight by more than an ulp),
and the shape of a real RL step (bfloat16 weights in trainer and engine, lr 1e-6: most bf16 values do not move).
Every push in both runs was verified (`weights.verify`) and every delta-rebuilt tensor checked bit-exactly on the
engine; the two runs' per-step rollout and training metrics are compared as well: they are equal where the run is
deterministic, which is what "the engine computed exactly what a full push gives" predicts.

The tiny recipe's model is 0.7 MB, so its pushes are all control round trips; the bandwidth-bound case is measured
apart on bigger bf16 models (`--sizes`, default 100m 500m): one engine, pushes of weights where the fraction of
elements the bf16 GRPO run changed (its median) moved, full vs delta, same server.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGIMES = {
    "fp32 lr 5e-4 (CPU recipe)": [],
    "bf16 lr 1e-6": ["trainer.dtype=bfloat16", "engine.args.dtype=bfloat16", "trainer.lr=1e-6"],
}
COMPARED = ("rollout/reward", "rollout/response_len", "train/loss")  # what the engines' log-probs drive


def pushes(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("step", 0) > 0 and "sync/push_s" in r]


def bump(sd: dict, frac: float, g) -> dict:
    """A step that changes `frac` of each tensor's elements (to a different bf16 value)."""
    import torch

    out = {}
    for k, v in sd.items():
        t = v.clone()
        idx = torch.randperm(t.numel(), generator=g)[: max(1, round(frac * t.numel()))]
        t.view(-1)[idx] = (t.view(-1)[idx].float() * 1.02 + 1e-3).to(t.dtype)
        out[k] = t
    return out


def sized(size: str, frac: float, tmp: Path, pushes: int = 3) -> list[dict]:
    import tempfile

    from safetensors.torch import load_file
    from torch import Generator

    from benchmarks.bench_weights import buckets
    from engines.vllm.config import VLLMEngineConfig
    from engines.vllm.weight_channel import VLLMWeightChannel
    from vime.models import make_model
    from vime.specs import make_engine_group

    path = make_model("qwen2", size, tmp / size, dtype="bfloat16")
    sd = load_file(str(path / "model.safetensors"))
    args = {"enforce_eager": True, "dtype": "bfloat16", "max_model_len": 256, "kv_cache_memory_bytes": 64 << 20}
    cfg = VLLMEngineConfig(args=args, startup_timeout_s=600)
    rows = []
    with make_engine_group(cfg, str(path), tempfile.mkdtemp(dir=tmp), weights_backend="gloo").start() as group:
        for delta in (False, True):
            g = Generator().manual_seed(0)
            ch = VLLMWeightChannel({"backend": "gloo", "delta": delta}, group.urls())
            cur, stats = sd, []
            ch.push(buckets(cur), f"{size}-base-{delta}")  # full: the base the deltas are against
            for i in range(pushes):
                cur = bump(cur, frac, g)
                stats.append(ch.push(buckets(cur), f"{size}-{delta}-{i}"))
            ch.close()
            rows.append(
                {
                    "model": f"qwen2-{size} bf16",
                    "delta": delta,
                    "changed_frac": frac,
                    "full_bytes": sum(v.numel() * v.element_size() for v in sd.values()),
                    "wire_bytes_median": statistics.median(s["bytes"] for s in stats),
                    "push_s_median": statistics.median(s["push_s"] for s in stats),
                    "verify_s_median": statistics.median(s["verify_s"] for s in stats),
                    "pushes_as_delta": sum(s.get("delta", 0.0) for s in stats),
                }
            )
    full, dlt = rows
    dlt["delta_over_full"] = dlt["push_s_median"] / full["push_s_median"]
    print(
        f"qwen2-{size} bf16, {frac:.2%} changed: full {full['push_s_median']:.2f} s, delta "
        f"{dlt['push_s_median']:.2f} s ({dlt['delta_over_full']:.2f}x), wire "
        f"{dlt['wire_bytes_median'] / full['wire_bytes_median']:.2%} of a full push",
        flush=True,
    )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="runs/bench_delta")
    ap.add_argument("--sizes", nargs="*", default=["100m", "500m"])
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import bar_png, train_run, write

    model = ROOT / "models" / "tiny-qwen2"
    if not (model / "config.json").exists():
        from vime.models import make_model

        make_model("qwen2", "tiny", model)
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows, labels, ratios = [], [], []
    for regime, sets in REGIMES.items():
        runs = {}
        for delta in (False, True):
            name = f"{'bf16' if sets else 'fp32'}-{'delta' if delta else 'full'}"
            common = [f"loop.num_steps={a.steps}", "loop.eval_every=0", "loop.eval_size=16", f"model.path={model}"]
            sets_all = [*common, *sets, f"weights.delta={delta}"]
            r = train_run("configs/grpo_tiny_cpu.yaml", out / name, sets_all, out / f"{name}.log")
            if r["rc"] != 0:
                print(f"{regime} delta={delta}: vime train failed (rc {r['rc']}), see {out / name}.log", flush=True)
                return 1
            runs[delta] = pushes(r["rows"])
        full, dlt = runs[False], runs[True]
        d_pushes = [p for p in dlt if p.get("sync/delta") == 1.0]
        row = {
            "regime": regime,
            "steps": a.steps,
            "pushes": len(dlt),
            "delta_pushes": len(d_pushes),  # the others had no base every engine held (the first one)
            "changed_frac_median": statistics.median(p["sync/changed_frac"] for p in d_pushes) if d_pushes else None,
            "changed_frac_per_step": [p["sync/changed_frac"] for p in dlt],
            "wire_fraction_median": statistics.median(p["sync/bytes"] / p["sync/full_bytes"] for p in d_pushes)
            if d_pushes
            else None,
            "full_push_s_median": statistics.median(p["sync/push_s"] for p in full),
            "delta_push_s_median": statistics.median(p["sync/push_s"] for p in d_pushes) if d_pushes else None,
            "verify_s_median_delta_run": statistics.median(p["sync/verify_s"] for p in dlt),
            "same_metrics_every_step": all(
                f.get(k) == d.get(k) for f, d in zip(full, dlt, strict=True) for k in COMPARED
            ),
        }
        if row["delta_push_s_median"]:
            row["delta_over_full"] = row["delta_push_s_median"] / row["full_push_s_median"]
        rows.append(row)
        print(
            f"{regime}: {row['delta_pushes']}/{row['pushes']} pushes as deltas, changed "
            f"{row['changed_frac_median']}, wire {row['wire_fraction_median']} of a full push, push "
            f"{row['delta_push_s_median']} s vs full {row['full_push_s_median']:.3f} s "
            f"({row.get('delta_over_full', float('nan')):.2f}x), same metrics every step: "
            f"{row['same_metrics_every_step']}",
            flush=True,
        )
        labels += [f"{regime}\nfull", f"{regime}\ndelta"]
        ratios += [row["full_push_s_median"], row["delta_push_s_median"] or 0.0]
    bf16 = next(r for r in rows if r["regime"].startswith("bf16"))
    by_size = [r for size in a.sizes for r in sized(size, bf16["changed_frac_median"], out)]
    for r in by_size:
        labels.append(f"{r['model']}\n{'delta' if r['delta'] else 'full'}")
        ratios.append(r["push_s_median"])
    payload = {
        "card": "CPU (no accelerator)",
        "backend": "gloo",
        "baseline": "weights.delta=false",
        "rows": rows,
        "by_size": by_size,
    }
    print("wrote", write("delta_cpu", payload))
    bar_png("delta_cpu", labels, ratios, "median push (s)", "delta vs full push (CPU, gloo)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
