"""Rollout throughput on one GPU: bare vLLM (its OpenAI completions route and its token-in/token-out generate
route) vs vime's engine adapter (on the generate route) vs vime's OpenAI gateway — one server, the
same token-id prompts, seeds, sampling (temperature 1, one log-prob per token, as RL needs) and concurrency,
in one run. Best of two passes per path (ROLLOUT_REPS), paths interleaved.
`python benchmarks/bench_gpu_rollout.py [model_dir]` (default models/qwen2-0.5b)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bar_png, exit_on_sigterm, write

REQUESTS, CONCURRENCY, PROMPT_LEN, MAX_TOKENS = 256, 128, 64, 128


def LIMITS():
    # adapter uses its own client's pool (VLLMClient: up to 512 connections, 64 kept alive)
    import httpx

    return httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)


def prompts() -> list[list[int]]:
    return [[3 + (i * 131 + j * 17) % 500 for j in range(PROMPT_LEN)] for i in range(REQUESTS)]


RETRIES = {"count": 0}


async def post(client, url: str, body: dict, headers: dict[str, str] | None = None):
    """One request; a connection the server dropped is retried once and counted (an H100 run lost one to
    httpx.ReadError after 166 good answers, cause not found)."""
    import httpx

    for attempt in (0, 1):
        try:
            r = await client.post(url, json=body, headers=headers)
            r.raise_for_status()
            return r
        except (httpx.ReadError, httpx.RemoteProtocolError):
            if attempt:
                raise
            RETRIES["count"] += 1


async def timed(one) -> tuple[float, int]:
    """Every prompt through `one(i, prompt) -> completion tokens`, CONCURRENCY at a time: (seconds, tokens)."""
    sem = asyncio.Semaphore(CONCURRENCY)

    async def gated(i: int, p: list[int]) -> int:
        async with sem:
            return await one(i, p)

    t = time.perf_counter()
    n = sum(await asyncio.gather(*(gated(i, p) for i, p in enumerate(prompts()))))
    return time.perf_counter() - t, n


async def drive_http(url: str, model: str, headers: dict[str, str] | None = None) -> tuple[float, int]:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=LIMITS()) as client:

        async def one(i: int, p: list[int]) -> int:
            body = {"model": model, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": i, "logprobs": 0}
            r = await post(client, url + "/v1/completions", body, headers)
            return int(r.json()["usage"]["completion_tokens"])

        return await timed(one)


async def drive_generate_route(url: str) -> tuple[float, int]:
    """Bare vLLM on the token-in/token-out route the adapter uses (the baseline for the adapter: the
    OpenAI completions route also formats and detokenizes each log-prob, which costs the server time)."""
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=LIMITS()) as client:

        async def one(i: int, p: list[int]) -> int:
            sp = {"n": 1, "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": i, "logprobs": 0, "output_kind": 2}
            r = await post(
                client, url + "/inference/v1/generate", {"token_ids": p, "sampling_params": sp, "stream": False}
            )
            return len(r.json()["choices"][0]["token_ids"])

        return await timed(one)


async def drive_adapter(url: str, version: tuple[int, int, int]) -> tuple[float, int]:
    from engines.vllm.client import VLLMClient
    from vime.types import SamplingParams

    client = VLLMClient(url, version=version)

    async def one(i: int, p: list[int]) -> int:
        (c,) = await client.generate_one(p, SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i))
        return len(c.token_ids)

    try:
        return await timed(one)
    finally:
        await client.aclose()


def main() -> None:
    import httpx
    import torch

    from engines.vllm.server import VLLMServer, kill_tree
    from vime.placement import free_port

    model = sys.argv[1] if len(sys.argv) > 1 else "models/qwen2-0.5b"
    out = Path(os.environ.get("VIME_BENCH_OUT", Path(__file__).resolve().parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0)
    server = VLLMServer(
        model,
        args={
            "enforce_eager": True,
            "dtype": "bfloat16",
            "max_model_len": 1024,
            "gpu_memory_utilization": 0.5,
            "max_num_seqs": 256,
        },
        log_path=out / "vllm_rollout.log",
        startup_timeout_s=900,
        guard=False,  # the baseline is vLLM as shipped; the adapter and gateway paths send the secret anyway
    )
    rows = []
    with server:
        url = server.base_url
        port = free_port()
        gw = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vime.gateway.server",
                "--engine-url",
                url,
                "--tokenizer",
                model,
                "--model-name",
                model,
                "--port",
                str(port),
                "--api-key",
                "bench",
            ],
            stdout=open(out / "gateway.log", "wb"),  # noqa: SIM115 - the gateway process owns it
            stderr=subprocess.STDOUT,
        )
        try:
            gw_url = f"http://127.0.0.1:{port}"
            for _ in range(240):
                try:
                    if httpx.get(gw_url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            paths = {
                "bare vLLM": lambda: asyncio.run(drive_http(url, model)),
                "bare vLLM generate route": lambda: asyncio.run(drive_generate_route(url)),
                "vime adapter": lambda: asyncio.run(drive_adapter(url, server.version)),
                "vime gateway": lambda: asyncio.run(drive_http(gw_url, model, {"Authorization": "Bearer bench"})),
            }
            paths["bare vLLM"]()  # warm-up
            for rep in range(int(os.environ.get("ROLLOUT_REPS", "2"))):
                for name, run in paths.items():
                    dt, n = run()
                    rows.append(
                        {"path": name, "rep": rep, "seconds": dt, "completion_tokens": n, "tokens_per_s": n / dt}
                    )
                    print(f"{name:13s} rep {rep}: {n / dt:8.0f} tok/s ({n} tokens, {dt:.1f} s)", flush=True)
        finally:
            kill_tree(gw.pid)
    best = {p: max(r["tokens_per_s"] for r in rows if r["path"] == p) for p in paths}
    # each vime path against bare vLLM on the route it rides: the adapter on /inference/v1/generate, the gateway
    # (an OpenAI completions endpoint) against vLLM's own /v1/completions
    ratios = {
        "adapter_over_bare": best["vime adapter"] / best["bare vLLM generate route"],
        "gateway_over_bare": best["vime gateway"] / best["bare vLLM"],
    }
    print(f"ratios (best pass): {ratios}")
    write(
        "gpu_rollout",
        {
            "card": card,
            "rows": rows,
            "best_tokens_per_s": best,
            **ratios,
            "requests": REQUESTS,
            "retried_requests": RETRIES["count"],
            "concurrency": CONCURRENCY,
            "prompt_len": PROMPT_LEN,
            "max_tokens": MAX_TOKENS,
            "model": model,
        },
        out,
    )
    bar_png(
        "gpu_rollout",
        list(best),
        list(best.values()),
        "completion tokens/s",
        f"rollout, {card}, {CONCURRENCY} concurrent (adapter {ratios['adapter_over_bare']:.2f}, "
        f"gateway {ratios['gateway_over_bare']:.2f})",
        out,
    )


if __name__ == "__main__":
    exit_on_sigterm()
    main()
