"""One vLLM server vs a prefill/decode pair (NixlConnector over UCX loopback, behind vllm-router) on the same
workload: completion tokens/s and mean time to first token, measured in one run. On a 2-core CPU these numbers
are for the record only: P/D pays an extra hop and a KV transfer and has no spare hardware to win it back."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bar_png, write

REQUESTS, CONCURRENCY, PROMPT_LEN, MAX_TOKENS = 64, 8, 200, 32
ARGS = {
    "enforce_eager": True,
    "dtype": "float32",
    "max_model_len": 512,
    "kv_cache_memory_bytes": 128 << 20,
    "block_size": 32,
}


async def drive(url: str, model: str, offset: int) -> dict[str, float]:
    import httpx

    sem = asyncio.Semaphore(CONCURRENCY)
    ttfts: list[float] = []

    async def one(client: httpx.AsyncClient, i: int) -> int:
        prompt = [3 + ((offset + i) * 31 + j * 7) % 500 for j in range(PROMPT_LEN)]  # fresh prompts
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
        }
        async with sem:
            t, n, first = time.perf_counter(), 0, None
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        if first is None:
                            first = time.perf_counter() - t
                        n += 1
            ttfts.append(first or 0.0)
            return n

    from vime.secret import auth_headers

    async with httpx.AsyncClient(timeout=600, headers=auth_headers()) as client:
        t = time.perf_counter()
        chunks = sum(await asyncio.gather(*(one(client, i) for i in range(REQUESTS))))
        dt = time.perf_counter() - t
    return {
        "seconds": dt,
        "tokens_per_s": REQUESTS * MAX_TOKENS / dt,
        "ttft_mean_s": sum(ttfts) / len(ttfts),
        "stream_chunks": chunks,
    }


def main() -> None:
    from engines.vllm.config import VLLMEngineConfig as EngineConfig
    from vime.models import make_model
    from vime.specs import make_engine_group

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_model("qwen2", "tiny", Path(tmp) / "m"))
        for name, cfg in (
            ("single server", EngineConfig(args=ARGS)),
            ("P/D 1+1 (nixl, vllm-router)", EngineConfig(topology="pd", args=ARGS)),
        ):
            with make_engine_group(cfg, model, tmp + "/" + name.split()[0]) as group:
                url = group.router.base_url if group.router else group.urls()[0]
                asyncio.run(drive(url, model, 10_000))  # warm-up (and the NIXL handshake)
                r = {"topology": name, **asyncio.run(drive(url, model, 0))}
                rows.append(r)
                print(f"{name:28s}: {r['tokens_per_s']:7.0f} tok/s, TTFT {1000 * r['ttft_mean_s']:6.0f} ms", flush=True)
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"P/D / single throughput ratio: {ratio:.2f}")
    print(
        "wrote",
        write(
            "pd_cpu",
            {
                "rows": rows,
                "ratio": ratio,
                "requests": REQUESTS,
                "concurrency": CONCURRENCY,
                "prompt_len": PROMPT_LEN,
                "max_tokens": MAX_TOKENS,
            },
        ),
    )
    bar_png(
        "pd_cpu",
        [r["topology"] for r in rows],
        [r["tokens_per_s"] for r in rows],
        "completion tokens/s",
        f"single vs P/D on CPU (ratio {ratio:.2f})",
    )


if __name__ == "__main__":
    main()
