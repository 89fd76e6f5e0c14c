"""Weight update on one GPU, colocated, per model size — vime vs vLLM's own CUDA-IPC push, same server, same run.

- vLLM baseline: an HF model in this process pushed with vLLM's `IPCWeightTransferEngine.trainer_send_weights`
  (send_mode="http": one handle per tensor, layerwise reload) — start + send + finish, as vLLM documents it.
- vime: the Megatron trainer (a Ray actor on the same GPU) pushes through `VLLMWeightChannel(backend=ipc)`:
  Megatron → HF layout conversion, the trainer's parameters read in place by the engine (what the conversion
  made, q/k/v, copied into the staging buffer mapped once), the recorded load, prefix-cache reset, pause/resume —
  the whole `push()` is timed, conversion included; and the same pushes with every tensor staged
  (`weights.in_place: false`, the path before), same run.
- ceiling: a device-to-device copy of 2 GiB (bytes read + written per second), measured in the same run.
Correctness: after a trainer step changed the weights, engine log-probs (greedy) vs the trainer's, and vs the
engine before the push. `python benchmarks/bench_gpu_weights.py [sizes...]` (default 0.5b 1.5b 7b).
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import card_slug, exit_on_sigterm, write

PUSHES = 5
MODELS = Path(os.environ.get("VIME_MODELS", "models"))


def copy_gbps(nbytes: int = 2 << 30) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times) / 1e9


def ensure_model(size: str) -> Path:
    import torch

    from vime.models import make_model

    path = MODELS / f"qwen2-{size}"
    if not (path / "config.json").exists():
        make_model("qwen2", size, path, dtype="bfloat16", device="cuda")
        gc.collect()
        torch.cuda.empty_cache()  # the engine and the baseline's copy need that memory (14B on an 80 GB card)
    return path


def engine_logprobs(url: str, version: tuple[int, int, int], prompt: list[int]) -> tuple[list[int], list[float]]:
    from engines.vllm.client import VLLMClient
    from vime.types import SamplingParams

    async def go():
        client = VLLMClient(url, version=version)
        try:
            (c,) = await client.generate_one(prompt, SamplingParams(max_tokens=16, temperature=0.0))
            return c.token_ids, c.logprobs
        finally:
            await client.aclose()

    return asyncio.run(go())


def vllm_push(url: str, model) -> float:
    import httpx
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerSendWeightsArgs, IPCWeightTransferEngine

    t = time.perf_counter()
    httpx.post(url + "/start_weight_update", timeout=300).raise_for_status()
    IPCWeightTransferEngine.trainer_send_weights(
        iter(model.named_parameters()), IPCTrainerSendWeightsArgs(send_mode="http", url=url)
    )
    httpx.post(url + "/finish_weight_update", timeout=300).raise_for_status()
    return time.perf_counter() - t


def bucket_for(nbytes: int) -> int:
    """VIME_BUCKET_MB, else the whole model in one round where the card has room for that copy next to trainer's
    and engine's and 12 GB besides (an H100 up to 7B, an H200 up to 14B), else 4 GiB."""
    import torch

    if os.environ.get("VIME_BUCKET_MB"):
        return int(os.environ["VIME_BUCKET_MB"])
    whole = -(-nbytes // (1 << 30)) << 10
    roomy = 3 * nbytes + 12e9 < torch.cuda.get_device_properties(0).total_memory
    return whole if roomy else 4096


def engine_memory_fraction(nbytes: int) -> float:
    """The engine's share of the card: its weights plus 6 GB (KV for a 1,024-token context, activations), at
    least 0.3 — so trainer and engine both fit at 14B on an 80 GB card."""
    import torch

    return round(max(0.3, (nbytes + 6e9) / torch.cuda.get_device_properties(0).total_memory), 3)


def round_trips(url: str, n: int = 10) -> dict[str, float]:
    """The floor a push stands on: one bare control round trip to the workers (API server -> EngineCore ->
    worker and back) and a pause + resume pair, medians of n."""
    import httpx

    from vime.secret import auth_headers

    def med(f) -> float:
        ts = []
        for _ in range(n + 1):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts[1:])

    with httpx.Client(timeout=60, headers=auth_headers()) as c:
        rpc = med(lambda: c.post(url + "/collective_rpc", json={"method": "vime_delta_version"}).raise_for_status())
        pause = {
            mode: med(
                lambda mode=mode: (
                    c.post(url + "/pause", params={"mode": mode}).raise_for_status(),
                    c.post(url + "/resume").raise_for_status(),
                )
            )
            for mode in ("keep", "abort")
        }
        reset = med(lambda: c.post(url + "/reset_prefix_cache").raise_for_status())
    return {
        "rtt_rpc_s": rpc,
        "rtt_pause_resume_keep_s": pause["keep"],
        "rtt_pause_resume_abort_s": pause["abort"],
        "rtt_reset_prefix_cache_s": reset,
    }


def bench_size(size: str, out_dir: Path, backend: str = "ipc", engine_env: dict[str, str] | None = None) -> dict:
    """backend=ipc: engine on this GPU, vLLM's own IPC push measured first as the baseline; backend=nccl: the
    engine on another GPU (engine_env CUDA_VISIBLE_DEVICES), vLLM's NCCL engine, no baseline."""
    from engines.vllm.server import VLLMServer

    path = ensure_model(size)
    nbytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    bucket_mb = bucket_for(nbytes)
    row: dict = {"size": size, "model_bytes": nbytes, "backend": backend, "bucket_mb": bucket_mb}
    server = VLLMServer(
        str(path),
        args={
            "enforce_eager": True,
            "dtype": "bfloat16",
            "max_model_len": 1024,
            "gpu_memory_utilization": engine_memory_fraction(nbytes),
            "worker_extension_cls": "engines.vllm.worker_ext.VimeWorkerExtension",
            "weight_transfer_config": {"backend": "vime_ipc" if backend == "ipc" else backend},
        },
        env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1", **(engine_env or {})},
        log_path=out_dir / f"vllm_{backend}_{size}.log",
        startup_timeout_s=900,
        guard=False,  # vLLM's own IPC sender (the baseline) cannot send vime's secret
    )
    t = time.perf_counter()
    with server:
        row["engine_start_s"] = time.perf_counter() - t
        url = server.base_url
        prompt = [3 + (i * 37) % 500 for i in range(48)]
        row.update(round_trips(url))
        if backend == "ipc":
            vllm_baseline(url, path, row)
        trainer_side(size, path, url, server.version, prompt, backend, bucket_mb, row)
    if "vllm_ipc_s" in row:
        row["vime_over_vllm"] = row["vime_push_s"] / row["vllm_ipc_s"]
        if "vime_push_abort_s" in row:
            row["vime_abort_over_vllm"] = row["vime_push_abort_s"] / row["vllm_ipc_s"]
        row["vllm_gb_per_s"] = nbytes / row["vllm_ipc_s"] / 1e9
    row["vime_gb_per_s"] = nbytes / row["vime_push_s"] / 1e9
    return row


def vllm_baseline(url: str, path: Path, row: dict) -> None:
    import httpx
    import torch
    from transformers import AutoModelForCausalLM

    # vLLM's own IPC push of the HF model (the same weights the server loaded)
    httpx.post(
        url + "/init_weight_transfer_engine", json={"init_info": {"mode": "vllm"}}, timeout=300
    ).raise_for_status()
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).cuda()
    times = [vllm_push(url, hf) for _ in range(PUSHES + 1)][1:]
    row["vllm_ipc_s"] = statistics.median(times)
    row["vllm_ipc_s_all"] = times
    httpx.post(url + "/reset_prefix_cache", timeout=60)
    del hf
    gc.collect()
    torch.cuda.empty_cache()


def trainer_side(
    size: str,
    path: Path,
    url: str,
    version: tuple[int, int, int],
    prompt: list[int],
    backend: str,
    bucket_mb: int,
    row: dict,
) -> None:
    """The Megatron trainer pushes through vime's weight channel; then engine vs trainer log-probs."""
    from vime.specs import make_trainer
    from vime.trainer import TrainerConfig
    from vime.types import Sample

    tcfg = TrainerConfig(
        world_size=1, gpus_per_rank=1, dtype="bfloat16", lr=1e-3, micro_batch_size=8, optimizer=size in ("0.5b", "1.5b")
    )
    t = time.perf_counter()
    trainer = make_trainer(tcfg, str(path))
    row["trainer_start_s"] = time.perf_counter() - t
    try:
        trainer.connect_weights(
            "engines.vllm.weight_channel:VLLMWeightChannel", {"backend": backend, "bucket_mb": bucket_mb}, [url]
        )
        before_ids, before_lp = engine_logprobs(url, version, prompt)
        if tcfg.optimizer:  # change the weights, so the push has something to prove
            sft = [Sample(prompt_ids=prompt[:16], response_ids=before_ids[:8], logprobs=[0.0] * 8)] * 4
            trainer.train_step(sft, "sft")
        # abort mode (what a sync loop's push amounts to: nothing is in flight) clears the caches while pausing;
        # keep (the default, for async partial rollouts) resets the prefix cache in one more round trip
        trainer.connect_weights(
            "engines.vllm.weight_channel:VLLMWeightChannel",
            {"backend": backend, "bucket_mb": bucket_mb, "pause_mode": "abort"},
            [url],
        )
        abort = [trainer.push_weights(f"a{i}") for i in range(PUSHES + 1)][1:]
        row["vime_push_abort_s"] = statistics.median(s["push_s"] for s in abort)
        row["vime_push_abort_s_all"] = [s["push_s"] for s in abort]
        trainer.connect_weights(
            "engines.vllm.weight_channel:VLLMWeightChannel", {"backend": backend, "bucket_mb": bucket_mb}, [url]
        )
        stats = [trainer.push_weights(f"v{i}") for i in range(PUSHES + 1)][1:]
        row["vime_push_s"] = statistics.median(s["push_s"] for s in stats)
        for phases, tag in ((stats, "keep"), (abort, "abort")):  # the timeline of one push, per control call
            for k in sorted({k for s in phases for k in s if k.startswith("phase/")}):
                row[f"timeline_{tag}/{k[6:]}"] = statistics.median(s.get(k, 0.0) for s in phases)
        row["vime_transfer_s"] = statistics.median(s["transfer_s"] for s in stats)
        row["vime_push_s_all"] = [s["push_s"] for s in stats]
        row["vime_verify_s"] = statistics.median(s["verify_s"] for s in stats)  # inside push_s (weights.verify)
        row["verify_share_of_push"] = row["vime_verify_s"] / row["vime_push_s"]
        row["vime_verify_engine_s"] = statistics.median(s["verify_engine_s"] for s in stats)  # the engines' side
        row["summed_in_copy"] = statistics.median(s.get("summed_in_copy", 0.0) for s in stats)  # parameters
        trainer.connect_weights(  # the same pushes with the engine reading every parameter back for the check
            "engines.vllm.weight_channel:VLLMWeightChannel",
            {"backend": backend, "bucket_mb": bucket_mb, "verify_read_back": True},
            [url],
        )
        back = [trainer.push_weights(f"r{i}") for i in range(PUSHES + 1)][1:]
        row["vime_push_read_back_s"] = statistics.median(s["push_s"] for s in back)
        row["vime_verify_read_back_s"] = statistics.median(s["verify_s"] for s in back)
        row["in_copy_over_read_back"] = row["vime_push_s"] / row["vime_push_read_back_s"]
        trainer.connect_weights(  # the same pushes with every tensor staged (the path before `in_place`)
            "engines.vllm.weight_channel:VLLMWeightChannel",
            {"backend": backend, "bucket_mb": bucket_mb, "in_place": False},
            [url],
        )
        staged = [trainer.push_weights(f"s{i}") for i in range(PUSHES + 1)][1:]
        row["vime_push_staged_s"] = statistics.median(s["push_s"] for s in staged)
        row["in_place_over_staged"] = row["vime_push_s"] / row["vime_push_staged_s"]
        trainer.connect_weights(  # the check's whole cost: the same pushes unverified
            "engines.vllm.weight_channel:VLLMWeightChannel",
            {"backend": backend, "bucket_mb": bucket_mb, "verify": False},
            [url],
        )
        off = [trainer.push_weights(f"u{i}") for i in range(PUSHES + 1)][1:]
        row["vime_push_unverified_s"] = statistics.median(s["push_s"] for s in off)
        row["verify_cost_share"] = 1 - row["vime_push_unverified_s"] / row["vime_push_s"]
        ids, lp = engine_logprobs(url, version, prompt)
        (tlp,) = trainer.logprobs([Sample(prompt_ids=prompt, response_ids=ids, logprobs=lp)], 1.0)
        row["engine_vs_trainer_max_abs"] = max(abs(a - b) for a, b in zip(lp, tlp))
        row["engine_vs_trainer_mean_abs"] = sum(abs(a - b) for a, b in zip(lp, tlp)) / len(lp)
        row["weights_changed"] = tcfg.optimizer
        if tcfg.optimizer:
            (old,) = trainer.logprobs([Sample(prompt_ids=prompt, response_ids=before_ids, logprobs=before_lp)], 1.0)
            row["engine_before_vs_trainer_after_max_abs"] = max(abs(a - b) for a, b in zip(before_lp, old))
    finally:
        trainer.shutdown()


def plot(rows: list[dict], out: Path, card: str, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = range(len(rows))
    bars = [
        ("vllm_ipc_s", "vLLM IPC push (HF model)"),
        ("vime_push_s", "vime push, verified (Megatron, ipc)"),
        ("vime_push_unverified_s", "vime push, unverified"),
    ]
    w = 0.8 / len(bars)
    for j, (key, label) in enumerate(bars):
        xs = [i + (j - 1) * w for i in x]
        ax.bar(xs, [1000 * r.get(key, 0.0) for r in rows], w, label=label)
        if key != "vllm_ipc_s":
            for xi, r in zip(xs, rows):
                if key in r:
                    ratio = r[key] / r["vllm_ipc_s"]
                    ax.text(xi, 1000 * r[key], f"{ratio:.2f}x", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), [r["size"] for r in rows])
    ax.set_ylabel("ms per weight update")
    ax.set_title(f"colocated weight update, {card}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)


def main() -> None:
    import torch

    from vime.placement import ensure_ray

    out = Path(os.environ.get("VIME_BENCH_OUT", Path(__file__).resolve().parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    sizes = sys.argv[1:] or ["0.5b", "1.5b", "7b"]
    card = torch.cuda.get_device_name(0)
    name = os.environ.get("VIME_BENCH_NAME", f"gpu_weights_{card_slug()}")
    ceiling = copy_gbps()
    print(f"{card}: device copy {ceiling:.0f} GB/s (read+write)", flush=True)
    ensure_ray()
    rows = []
    for size in sizes:
        try:
            row = bench_size(size, out)
        except Exception as e:  # noqa: BLE001 - record and go on to the next size
            row = {"size": size, "error": f"{type(e).__name__}: {e}"[:2000]}
        row["copy_fraction"] = (
            (2 * row["model_bytes"] / ceiling / 1e9) / row["vime_push_s"] if "vime_push_s" in row else None
        )
        rows.append(row)
        print(
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if not k.endswith("_all")},
            flush=True,
        )
        write(name, {"card": card, "copy_gb_per_s": ceiling, "pushes": PUSHES, "rows": rows}, out)
    good = [r for r in rows if "vime_push_s" in r]
    if good:
        plot(good, out, card, name)


if __name__ == "__main__":
    exit_on_sigterm()
    main()
