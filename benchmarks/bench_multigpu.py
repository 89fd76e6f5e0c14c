"""Runs that need two GPUs of one host (issue [multigpu]); each part writes its own JSON under $VIME_BENCH_OUT.

  python benchmarks/bench_multigpu.py tp        # Megatron TP=2 and DP=2 vs TP=1: logits and one train step
  python benchmarks/bench_multigpu.py nccl      # trainer on GPU 0, engine on GPU 1: NCCL push, 0.5b and 1.5b
  python benchmarks/bench_multigpu.py pd        # prefill on GPU 0, decode on GPU 1 (NIXL, vllm-router) vs one server
  python benchmarks/bench_multigpu.py pd_equal  # the same pair in float32: greedy tokens vs one server, exactly

The GRPO step with split placement is `vime train -c configs/grpo_2gpu_nccl.yaml` (run by scripts/device_run.sh).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import exit_on_sigterm, write

OUT = Path(os.environ.get("VIME_BENCH_OUT", Path(__file__).resolve().parent / "results"))
MODELS = Path(os.environ.get("VIME_MODELS", "models"))


def batch(n: int = 8, length: int = 64):
    from vime.types import Sample

    rows = [[3 + (i * 53 + j * 11) % 500 for j in range(length)] for i in range(n)]
    return [Sample(prompt_ids=r[:8], response_ids=r[8:], logprobs=[0.0] * (length - 8)) for r in rows]


def tp() -> None:
    """Same weights, same batch: TP=1, TP=2 and DP=2 logits and one SFT step (loss, grad norm)."""
    import torch

    from benchmarks.bench_gpu_weights import ensure_model
    from vime.placement import ensure_ray
    from vime.specs import make_trainer
    from vime.trainer import TrainerConfig

    ensure_ray()
    model = str(ensure_model("0.5b"))
    tokens = [3 + (j * 29) % 500 for j in range(128)]
    res: dict = {"model": "qwen2-0.5b", "card": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
    logits = {}
    for name, tp_, world in (("tp1", 1, 1), ("tp2", 2, 2), ("dp2", 1, 2)):
        t = time.perf_counter()
        trainer = make_trainer(
            TrainerConfig(world_size=world, tp=tp_, gpus_per_rank=1, dtype="bfloat16", lr=1e-5, micro_batch_size=4),
            model,
        )
        try:
            logits[name] = trainer.forward_logits(tokens).float()
            stats = trainer.train_step(batch(), "sft")
            res[name] = {"start_s": time.perf_counter() - t, "loss": stats["loss"], "grad_norm": stats["grad_norm"]}
        finally:
            trainer.shutdown()
        print(name, res[name], flush=True)
    for name in ("tp2", "dp2"):
        d = (logits[name] - logits["tp1"]).abs()
        res[name]["logits_max_abs_vs_tp1"] = float(d.max())
        res[name]["logits_mean_abs_vs_tp1"] = float(d.mean())
        res[name]["argmax_agree_vs_tp1"] = float((logits[name].argmax(-1) == logits["tp1"].argmax(-1)).float().mean())
        res[name]["loss_rel_diff_vs_tp1"] = abs(res[name]["loss"] - res["tp1"]["loss"]) / abs(res["tp1"]["loss"])
    res["logits_abs_scale"] = float(logits["tp1"].abs().mean())
    print(res, flush=True)
    write("multigpu_tp", res, OUT)


def p2p_gbps(nbytes: int = 1 << 30) -> float:
    """GPU 0 → GPU 1 copy (NVLink if the GPUs have it), bytes moved per second."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    times = []
    for i in range(13):
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(1)
        if i >= 3:
            times.append(time.perf_counter() - t)
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / statistics.median(times) / 1e9


def nccl() -> None:
    """Trainer on GPU 0 (Ray sees only it), engine on GPU 1: vLLM's NCCL weight-transfer engine."""
    import subprocess

    import torch

    from benchmarks.bench_gpu_weights import bench_size

    card = torch.cuda.get_device_name(0)
    link = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, check=False).stdout
    bw = p2p_gbps()
    print(f"GPU0->GPU1 copy {bw:.0f} GB/s", flush=True)
    os.environ["CUDA_VISIBLE_DEVICES"] = "0"  # for Ray, started below: the trainer gets GPU 0
    from vime.placement import ensure_ray

    ensure_ray()
    rows = []
    for size in ("0.5b", "1.5b"):
        try:
            row = bench_size(size, OUT, backend="nccl", engine_env={"CUDA_VISIBLE_DEVICES": "1"})
            row["fraction_of_p2p"] = row["vime_gb_per_s"] / bw
        except Exception as e:  # noqa: BLE001 - record the failure in the result row and go on
            row = {"size": size, "error": f"{type(e).__name__}: {e}"[:2000]}
        rows.append(row)
        print({k: v for k, v in row.items() if not k.endswith("_all")}, flush=True)
        write("multigpu_nccl", {"card": card, "gpus": 2, "p2p_gb_per_s": bw, "topology": link, "rows": rows}, OUT)


def greedy_top(url: str, model: str, prompts: list[list[int]]) -> list[tuple[list[int], list[dict[str, float]]]]:
    """Greedy ids with the top-5 log-probs at each position (to tell a near-tie from a wrong token)."""
    import httpx

    from vime.secret import auth_headers

    out = []
    for p in prompts:
        body = {
            "model": model,
            "prompt": p,
            "max_tokens": 32,
            "logprobs": 5,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
        }
        r = httpx.post(url + "/v1/completions", json=body, timeout=300, headers=auth_headers())
        r.raise_for_status()
        ch = r.json()["choices"][0]
        out.append((ch["token_ids"], ch["logprobs"]["top_logprobs"]))
    return out


def pd_equal() -> None:
    """bf16 greedy decoding of a random model sits on near-ties (top-2 log-probs within bf16 noise), so P/D vs
    one server is checked in float32 (Triton attention: FlashAttention has no fp32), where only a wrong KV
    transfer can change a token; for any mismatch, the margin at the first differing position is reported."""
    import torch

    from benchmarks.bench_gpu_weights import ensure_model
    from engines.vllm.config import RoleConfig
    from engines.vllm.config import VLLMEngineConfig as EngineConfig
    from vime.specs import make_engine_group

    model = str(ensure_model("0.5b"))
    args = {
        "enforce_eager": True,
        "dtype": "float32",
        "max_model_len": 1024,
        "gpu_memory_utilization": 0.4,
        "attention_backend": "TRITON_ATTN",
    }
    prompts = [[3 + (i * 41 + j * 13) % 500 for j in range(300)] for i in range(8)]
    got = {}
    for name, cfg in (
        ("single", EngineConfig(args=args, env={"CUDA_VISIBLE_DEVICES": "0"}, startup_timeout_s=900)),
        (
            "pd",
            EngineConfig(
                topology="pd",
                args=args,
                startup_timeout_s=900,
                prefill=RoleConfig(env={"CUDA_VISIBLE_DEVICES": "0"}),
                decode=RoleConfig(env={"CUDA_VISIBLE_DEVICES": "1"}),
            ),
        ),
    ):
        with make_engine_group(cfg, model, str(OUT / f"pd_equal_{name}_logs")) as group:
            url = group.router.base_url if group.router else group.urls()[0]
            got[name] = greedy_top(url, model, prompts)
    rows = []
    for (a, top), (b, _) in zip(got["single"], got["pd"]):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        row = {"equal": a == b, "first_diff": first}
        if first is not None:  # single server's log-probs of its token and of P/D's token at that position
            lp = {int(k.split(":")[-1]) if k.startswith("token_id:") else k: v for k, v in top[first].items()}
            row["single_top"] = top[first]
            row["margin_nats"] = lp.get(a[first], float("nan")) - lp.get(b[first], float("nan"))
        rows.append(row)
    res = {
        "card": torch.cuda.get_device_name(0),
        "gpus": 2,
        "dtype": "float32",
        "attention_backend": "TRITON_ATTN",
        "greedy_equal": f"{sum(r['equal'] for r in rows)}/{len(rows)}",
        "tokens_per_prompt": 32,
        "rows": rows,
    }
    print(res, flush=True)
    write("multigpu_pd_equal", res, OUT)


def pd() -> None:
    import torch

    import benchmarks.bench_pd as load
    from benchmarks.bench_gpu_weights import ensure_model
    from engines.vllm.config import RoleConfig
    from engines.vllm.config import VLLMEngineConfig as EngineConfig
    from vime.specs import make_engine_group

    load.REQUESTS, load.CONCURRENCY, load.PROMPT_LEN, load.MAX_TOKENS = 256, 32, 1024, 64
    model = str(ensure_model("0.5b"))
    args = {"enforce_eager": True, "dtype": "bfloat16", "max_model_len": 2048, "gpu_memory_utilization": 0.4}
    prompts = [[3 + (i * 41 + j * 13) % 500 for j in range(300)] for i in range(8)]
    rows, ids = [], {}
    for name, cfg in (
        ("single server", EngineConfig(args=args, env={"CUDA_VISIBLE_DEVICES": "0"}, startup_timeout_s=900)),
        (
            "P/D 1+1 (nixl, vllm-router)",
            EngineConfig(
                topology="pd",
                args=args,
                startup_timeout_s=900,
                prefill=RoleConfig(env={"CUDA_VISIBLE_DEVICES": "0"}),
                decode=RoleConfig(env={"CUDA_VISIBLE_DEVICES": "1"}),
            ),
        ),
    ):
        with make_engine_group(cfg, model, str(OUT / ("pd_logs" if "P/D" in name else "single_logs"))) as group:
            url = group.router.base_url if group.router else group.urls()[0]
            ids[name] = [t for t, _ in greedy_top(url, model, prompts)]
            asyncio.run(load.drive(url, model, 10_000))  # warm-up (and the NIXL handshake)
            r = {"topology": name, **asyncio.run(load.drive(url, model, 0))}
            if group.router:
                r["engine_counters"] = group.step_metrics()
            rows.append(r)
            print(f"{name}: {r['tokens_per_s']:.0f} tok/s, TTFT {1000 * r['ttft_mean_s']:.0f} ms", flush=True)
    names = list(ids)
    equal = sum(a == b for a, b in zip(ids[names[0]], ids[names[1]]))
    res = {
        "card": torch.cuda.get_device_name(0),
        "gpus": 2,
        "rows": rows,
        "greedy_equal": f"{equal}/{len(prompts)}",
        "throughput_ratio_pd_over_single": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"],
        "ttft_ratio_pd_over_single": rows[1]["ttft_mean_s"] / rows[0]["ttft_mean_s"],
        "requests": load.REQUESTS,
        "concurrency": load.CONCURRENCY,
        "prompt_len": load.PROMPT_LEN,
        "max_tokens": load.MAX_TOKENS,
    }
    print({k: v for k, v in res.items() if k != "rows"}, flush=True)
    write("multigpu_pd", res, OUT)


if __name__ == "__main__":
    exit_on_sigterm()
    OUT.mkdir(parents=True, exist_ok=True)
    {"tp": tp, "nccl": nccl, "pd": pd, "pd_equal": pd_equal}[sys.argv[1]]()
