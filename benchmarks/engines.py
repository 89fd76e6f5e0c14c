"""vLLM and SGLang on one workload, same card, same run: rollout tokens/s and time to first token at the same
model, prompts, sampling and concurrency; the in-place weight update; engine-vs-trainer log-prob mismatch and
reward over the same short GRPO run (configs/grpo_gpu.yaml vs configs/grpo_gpu_sglang.yaml).

GPU only (SGLang does not serve on the CPU machines here). Each part runs both engines back to back:
  python benchmarks/engines.py serve --model M      tokens/s, TTFT, push seconds       -> engines_serve.json
  python benchmarks/engines.py grpo --model M       two GRPO runs, mismatch per step   -> engines_grpo.json
  python benchmarks/engines.py report               both, side by side                 -> engines_<card>.json + PNG
SGLang's own site-packages (its pins clash with vLLM's) come from VIME_SGLANG_PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, exit_on_sigterm, train_run, write

ROOT = Path(__file__).resolve().parents[1]
ENGINE_ARGS = {  # both eager, both bf16, both about 0.3 of the card for weights + KV
    "vllm": {"enforce_eager": True, "dtype": "bfloat16", "max_model_len": 1024, "gpu_memory_utilization": 0.3,
             "max_num_seqs": 256},
    "sglang": {"dtype": "bfloat16", "context_length": 1024, "mem_fraction_static": 0.3, "max_running_requests": 256,
               "attention_backend": "triton", "sampling_backend": "pytorch", "disable_cuda_graph": True,
               "skip_server_warmup": True},
}  # fmt: skip
STEP_KEYS = ("step", "rollout/reward", "consistency/mean_abs_diff", "consistency/max_abs_diff", "time/step")
RECIPES = {"vllm": "configs/grpo_gpu.yaml", "sglang": "configs/grpo_gpu_sglang.yaml"}


def sglang_env() -> dict[str, str]:
    extra = os.environ.get("VIME_SGLANG_PYTHONPATH")
    return {"PYTHONPATH": f"{extra}{os.pathsep}{ROOT}"} if extra else {}


def out_dir() -> Path:
    return Path(os.environ.get("VIME_BENCH_OUT", RESULTS))


async def rollout(engine: Any, prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict[str, float]:
    from vime.types import SamplingParams

    sem = asyncio.Semaphore(concurrency)
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, extra={"ignore_eos": True})
    ttfts: list[float] = []

    async def one(p: list[int]) -> int:
        async with sem:
            t0, first, n = time.perf_counter(), None, 0
            async for c in engine.stream(p, params):
                if first is None and c.token_ids:
                    first = time.perf_counter() - t0
                n = len(c.token_ids)
            ttfts.append(first if first is not None else float("nan"))
            return n

    t = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
    wall = time.perf_counter() - t
    return {
        "tokens": float(tokens),
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(ttfts),
        "ttft_p90_s": sorted(ttfts)[int(0.9 * (len(ttfts) - 1))],
    }


def serve_one(name: str, model: str, n_prompts: int, prompt_len: int, max_tokens: int, concurrency: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from vime.registry import ENGINES, load_object

    spec = ENGINES.get(name)
    cfg = spec.config(name=name, args=ENGINE_ARGS[name], env=sglang_env() if name == "sglang" else {})
    group = spec.make_group(cfg, model_path=model, log_dir=str(out_dir() / f"logs_{name}"), weights_backend="ipc")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 150_000) for _ in range(prompt_len)] for _ in range(n_prompts)]
    t = time.perf_counter()
    group.start()
    out: dict[str, Any] = {"start_s": time.perf_counter() - t}
    try:
        engine = group.pick()
        asyncio.run(rollout(engine, prompts[:8], 8, 8))  # warm-up
        out["rollout"] = asyncio.run(rollout(engine, prompts, max_tokens, concurrency))
        state: dict[str, torch.Tensor] = {}
        for f in sorted(Path(model).glob("*.safetensors")):
            state.update({k: v.to("cuda") for k, v in load_file(str(f)).items()})
        items = sorted(state.items())
        channel = load_object(spec.weight_channel)({"backend": "ipc", "bucket_mb": 1024}, group.urls())
        channel.connect()
        pushes = []
        for i in range(5):
            bucket, size, buckets = [], 0, []
            for n, v in items:
                bucket.append((n, v))
                size += v.numel() * v.element_size()
                if size >= 1024 << 20:
                    buckets.append(bucket)
                    bucket, size = [], 0
            buckets.append(bucket)
            pushes.append(channel.push(buckets, f"bench-{i}"))
        channel.close()
        out["push_s"] = [p["push_s"] for p in pushes]
        out["push_median_s"] = statistics.median(out["push_s"][1:])
        out["push_bytes"] = pushes[-1]["bytes"]
        out["server_version"] = getattr(group.servers[0], "version", None)
    finally:
        group.stop()
    return out


def serve(args: argparse.Namespace) -> None:
    res = {}
    for name in args.engines:
        print(f"== {name}", flush=True)
        res[name] = serve_one(name, args.model, args.prompts, args.prompt_len, args.max_tokens, args.concurrency)
        print(json.dumps(res[name], indent=1), flush=True)
    workload = {k: getattr(args, k) for k in ("model", "prompts", "prompt_len", "max_tokens", "concurrency")}
    write("engines_serve", {"workload": workload, "engines": res}, out_dir())


def grpo(args: argparse.Namespace) -> None:
    """Runs already in this folder's engines_grpo.json are kept (one engine per call fits a device call's limit)."""
    done = out_dir() / "engines_grpo.json"
    res = json.loads(done.read_text())["runs"] if done.exists() else {}
    for name in args.engines:
        sets = [f"model.path={args.model}", f"loop.num_steps={args.steps}"]
        if name == "sglang" and sglang_env():
            sets.append(f"engine.env.PYTHONPATH={sglang_env()['PYTHONPATH']}")
        run = train_run(RECIPES[name], Path(f"/tmp/runs/engines_{name}"), sets, out_dir() / f"grpo_{name}.log")
        rows = [r for r in run["rows"] if r.get("step", -1) >= 0 and "consistency/mean_abs_diff" in r]
        res[name] = {
            "rc": run["rc"],
            "seconds": run["seconds"],
            "eval": run["eval"],
            "steps": [{k: r.get(k) for k in STEP_KEYS} for r in rows],
        }
        print(name, run["rc"], f"{run['seconds']:.0f}s", res[name]["steps"][-1:] if rows else "no rows", flush=True)
    write("engines_grpo", {"recipes": RECIPES, "runs": res}, out_dir())


def report(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src = Path(args.src)
    serve_ = json.loads((src / "engines_serve.json").read_text())
    grpo_ = json.loads((src / "engines_grpo.json").read_text())
    card = (serve_["machine"].get("gpu") or "cpu").replace("NVIDIA ", "").replace(" ", "_").lower()
    names = [n for n in ("vllm", "sglang") if n in serve_["engines"]]
    table = {}
    for n in names:
        s, g = serve_["engines"][n], grpo_["runs"].get(n, {})
        steps = g.get("steps", [])
        mean = [x["consistency/mean_abs_diff"] for x in steps]
        reward = [x["rollout/reward"] for x in steps]
        table[n] = {
            "tokens_per_s": s["rollout"]["tokens_per_s"],
            "ttft_median_s": s["rollout"]["ttft_median_s"],
            "ttft_p90_s": s["rollout"]["ttft_p90_s"],
            "push_median_s": s["push_median_s"],
            "mismatch_mean_first5": statistics.mean(mean[:5]) if mean else None,
            "mismatch_mean_last5": statistics.mean(mean[-5:]) if mean else None,
            "mismatch_max": max(x["consistency/max_abs_diff"] for x in steps) if steps else None,
            "reward_first6": statistics.mean(reward[:6]) if reward else None,
            "reward_last6": statistics.mean(reward[-6:]) if reward else None,
            "eval": g.get("eval"),
            "grpo_seconds": g.get("seconds"),
        }
    ratios = {}
    if len(names) == 2:
        v, s = table["vllm"], table["sglang"]
        ratios = {
            "tokens_per_s_sglang_over_vllm": s["tokens_per_s"] / v["tokens_per_s"],
            "ttft_sglang_over_vllm": s["ttft_median_s"] / v["ttft_median_s"],
            "push_sglang_over_vllm": s["push_median_s"] / v["push_median_s"],
        }
    payload = {"card": serve_["machine"].get("gpu"), "workload": serve_["workload"], "table": table, "ratios": ratios,
               "serve": serve_, "grpo": grpo_}  # fmt: skip
    path = write(f"engines_{card}", payload, Path(args.out))
    print(json.dumps({"table": table, "ratios": ratios}, indent=1))
    fig, ax = plt.subplots(1, 5, figsize=(19, 3.6))
    for i, (key, label) in enumerate(
        [("tokens_per_s", "rollout tokens/s"), ("ttft_median_s", "TTFT median (s)"), ("push_median_s", "push (s)")]
    ):
        ax[i].bar(names, [table[n][key] for n in names], color=["#4c72b0", "#dd8452"][: len(names)])
        ax[i].set_title(label, fontsize=10)
    for n in names:
        steps = grpo_["runs"].get(n, {}).get("steps", [])
        ax[3].plot([x["step"] for x in steps], [x["consistency/mean_abs_diff"] for x in steps], label=n)
        ax[4].plot([x["step"] for x in steps], [x["rollout/reward"] for x in steps], label=n)
    ax[3].set(title="engine vs trainer mean |Δ log p|", xlabel="RL step")
    ax[4].set(title="rollout reward", xlabel="RL step")
    ax[3].legend()
    fig.suptitle(f"vLLM vs SGLang, same workload, {payload['card']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    print(path, path.with_suffix(".png"))


def main() -> None:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    for name in ("serve", "grpo"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True)
        s.add_argument("--engines", nargs="+", default=["vllm", "sglang"])
    sub.choices["serve"].add_argument("--prompts", type=int, default=256)
    sub.choices["serve"].add_argument("--prompt-len", type=int, default=128)
    sub.choices["serve"].add_argument("--max-tokens", type=int, default=256)
    sub.choices["serve"].add_argument("--concurrency", type=int, default=64)
    sub.choices["grpo"].add_argument("--steps", type=int, default=30)
    r = sub.add_parser("report")
    r.add_argument("--src", default=str(out_dir()))
    r.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    {"serve": serve, "grpo": grpo, "report": report}[args.part](args)


if __name__ == "__main__":
    main()
