"""Chat throughput through the vime gateway vs straight to the same vLLM server (its own
/v1/chat/completions), same prompts, seeds and concurrency, measured in one run. The gateway runs in its own
process (as `vime serve` does), so it does not share a GIL with the load generator."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bar_png, write

REQUESTS, CONCURRENCY, MAX_TOKENS = 256, 64, 64


async def drive(base_url: str, api_key: str, model: str) -> tuple[float, int]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> int:
        async with sem:
            r = await client.chat.completions.create(
                model=model,
                max_tokens=MAX_TOKENS,
                seed=i,
                temperature=1.0,
                messages=[{"role": "user", "content": f"{i % 20}+{i % 7}="}],
            )
            return r.usage.completion_tokens

    t = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(REQUESTS))))
    dt = time.perf_counter() - t
    await client.close()
    return dt, tokens


def main() -> None:
    import subprocess

    import httpx

    from engines.vllm.config import VLLMEngineConfig as EngineConfig
    from engines.vllm.server import kill_tree
    from vime.models import make_model
    from vime.placement import free_port
    from vime.specs import make_engine_group

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model("qwen2", "tiny", Path(tmp) / "m")
        cfg = EngineConfig(
            args={
                "enforce_eager": True,
                "dtype": "float32",
                "max_model_len": 512,
                "kv_cache_memory_bytes": 128 << 20,
                "max_num_seqs": 128,
            }
        )
        with make_engine_group(cfg, str(model), tmp) as group:
            port = free_port()
            gw = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vime.gateway.server",
                    "--engine-url",
                    group.urls()[0],
                    "--tokenizer",
                    str(model),
                    "--port",
                    str(port),
                    "--api-key",
                    "bench",
                ]
            )
            gw_url = f"http://127.0.0.1:{port}/v1"
            for _ in range(120):
                try:
                    if httpx.get(gw_url[:-3] + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            asyncio.run(drive(group.urls()[0] + "/v1", "none", str(model)))  # warm-up
            asyncio.run(drive(gw_url, "bench", str(model)))
            for rep in range(2):
                for name, url, key in (
                    ("bare vLLM", group.urls()[0] + "/v1", "none"),
                    ("vime gateway", gw_url, "bench"),
                ):
                    dt, tokens = asyncio.run(drive(url, key, str(model)))
                    rows.append(
                        {
                            "path": name,
                            "rep": rep,
                            "seconds": dt,
                            "completion_tokens": tokens,
                            "tokens_per_s": tokens / dt,
                        }
                    )
                    print(f"{name:13s} rep {rep}: {tokens / dt:7.0f} tok/s ({tokens} tokens, {dt:.1f} s)", flush=True)
            kill_tree(gw.pid)
    best = {p: max(r["tokens_per_s"] for r in rows if r["path"] == p) for p in ("bare vLLM", "vime gateway")}
    ratio = best["vime gateway"] / best["bare vLLM"]
    print(f"gateway / bare vLLM throughput ratio: {ratio:.2f} (best of 2 each)")
    print(
        "wrote",
        write(
            "gateway_cpu",
            {"rows": rows, "ratio": ratio, "requests": REQUESTS, "concurrency": CONCURRENCY, "max_tokens": MAX_TOKENS},
        ),
    )
    bar_png(
        "gateway_cpu",
        list(best),
        list(best.values()),
        "completion tokens/s",
        f"chat throughput, {CONCURRENCY} concurrent (ratio {ratio:.2f})",
    )


if __name__ == "__main__":
    main()
