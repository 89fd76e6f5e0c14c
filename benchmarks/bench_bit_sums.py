"""The push check's bit sums: `python benchmarks/bench_bit_sums.py [--gb 2]` (a GPU when there is one, else the CPU).

Times what each side of a verified push reads per tensor — the bit sums (`fingerprint.bit_sum`: 4-byte words) —
against the baseline, the same sums over 2-byte elements as before (int16 into int32, one element at a time),
and a plain copy of the same bytes as the ceiling, on bf16: one large tensor and a model's worth of tensors
(0.5B Qwen2's shapes, ~290 tensors: launches more than bandwidth; on a GPU also a 7B engine's parameters). On a
GPU also what a push runs: the bit sums and the copy graphed, and the Triton kernel (`word_sums.py`) summing
alone and summing inside the copy. Writes
benchmarks/results/bit_sums_<card>.{json,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def qwen2_05b_shapes() -> list[tuple[int, ...]]:
    h, i, kv, layers = 896, 4864, 128, 24
    per_layer = [(h, h), (h,), (kv, h), (kv,), (kv, h), (kv,), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]
    return [(151936, h)] + per_layer * layers + [(h,)]


def qwen2_7b_engine_shapes() -> list[tuple[int, ...]]:
    """A 7B Qwen2's parameters as vLLM holds them (q/k/v and gate/up fused, lm_head apart): what an engine sums."""
    h, i, qkv, layers = 3584, 18944, 4608, 28
    per_layer = [(qkv, h), (qkv,), (h, h), (2 * i, h), (h, i), (h,), (h,)]
    return [(152064, h)] + per_layer * layers + [(h,), (152064, h)]


def kernel_sums(ts: list[Any], dst: list[Any] | None) -> Callable[[], Any]:
    """The word-sum kernel (`word_sums.py`) over every tensor, copying into `dst` as it reads, as one graph."""
    import torch

    from engines.vllm import word_sums
    from engines.vllm.graphs import captured

    out = torch.zeros(len(ts), dtype=torch.int32, device=ts[0].device)

    def run() -> torch.Tensor:
        out.zero_()
        for k, t in enumerate(ts):
            word_sums.launch(word_sums.words(t), out, k, None if dst is None else word_sums.words(dst[k]))
        return out

    run()  # compiled before the capture
    return captured(run, ts[0].device)


def graphed(ts: list[Any], timed: Callable[[Callable[[], object]], float]) -> dict[str, Any]:
    """What a push runs on a GPU, the same tensors every time: PyTorch's bit sums and copy graphed, and the kernel
    summing alone and inside the copy; each checked against `fingerprint.bit_sum`."""
    import torch

    from engines.vllm import word_sums
    from engines.vllm.fingerprint import bit_sum, graphed_bits, stacked_bits
    from engines.vllm.graphs import captured

    dst = [torch.empty_like(t) for t in ts]
    want = stacked_bits([bit_sum(t) for t in ts])
    out: dict[str, Any] = {
        "graphed_words_ms": timed(lambda: graphed_bits(ts)) * 1e3,
        "graphed_copy_ms": timed(captured(lambda: torch._foreach_copy_(dst, ts), ts[0].device)) * 1e3,
        "graphed_words_exact": graphed_bits(ts) == want,
    }
    if word_sums.usable(ts[0].device):
        sums_only, fused = kernel_sums(ts, None), kernel_sums(ts, dst)
        out["kernel_words_ms"] = timed(lambda: sums_only().tolist()) * 1e3
        out["kernel_copy_and_words_ms"] = timed(lambda: fused().tolist()) * 1e3
        out["kernel_words_exact"] = sums_only().tolist() == want
        for t in dst:
            t.zero_()
        out["kernel_copy_exact"] = fused().tolist() == want and all(torch.equal(x, y) for x, y in zip(dst, ts))
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0, help="size of the one large tensor")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.common import bar_png, card_slug, write
    from engines.vllm.fingerprint import stacked_bits, tensor_sums

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        torch.set_num_threads(1)  # as a push's check runs (`one_thread`)
        a.gb = min(a.gb, 0.2)

    def timed(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(a.repeats):
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def old_bits(ts: list[torch.Tensor]) -> list[int]:  # the baseline: 2-byte elements into an int32
        return stacked_bits([t.reshape(-1).view(torch.int16).sum(dtype=torch.int32) for t in ts])

    g = torch.Generator(device=dev).manual_seed(0)
    cases = {
        "one tensor": [torch.randn(int(a.gb * 2**30) // 2, generator=g, device=dev, dtype=torch.bfloat16)],
        "0.5B model": [torch.randn(s, generator=g, device=dev, dtype=torch.bfloat16) for s in qwen2_05b_shapes()],
    }
    if dev == "cuda":
        cases["7B engine"] = [torch.randn(s, device=dev, dtype=torch.bfloat16) for s in qwen2_7b_engine_shapes()]
    rows = {}
    for case, ts in cases.items():
        nbytes = sum(t.numel() * t.element_size() for t in ts)
        new = timed(lambda ts=ts: tensor_sums(ts, [False] * len(ts)))
        old = timed(lambda ts=ts: old_bits(ts))
        copy = timed(lambda ts=ts: [t.clone() for t in ts])
        extra = graphed(ts, timed) if dev == "cuda" else {}
        rows[case] = extra | {
            "bytes": nbytes,
            "tensors": len(ts),
            "words_ms": new * 1e3,
            "elements_ms (baseline)": old * 1e3,
            "copy_ms": copy * 1e3,
            "words_GBps": nbytes / new / 1e9,
            "elements_GBps": nbytes / old / 1e9,
            "copy_GBps (read+write)": 2 * nbytes / copy / 1e9,
            "ratio_words_vs_elements": new / old,
        }
        print(
            f"{case}: {nbytes / 2**30:.2f} GiB in {len(ts)} tensors: words {new * 1e3:.2f} ms "
            f"({nbytes / new / 1e9:.0f} GB/s), 2-byte elements {old * 1e3:.2f} ms ({nbytes / old / 1e9:.0f} GB/s): "
            f"ratio {new / old:.3f}; copy {copy * 1e3:.2f} ms"
        )
    card = card_slug()
    write(
        f"bit_sums_{card}",
        {"device": dev, "dtype": "bfloat16", "baseline": "2-byte elements into int32", "cases": rows},
    )
    labels = [f"{c}\n{k}" for c in rows for k in ("words", "elements")]
    values = [rows[c][f"{k}_GBps"] for c in rows for k in ("words", "elements")]
    bar_png(f"bit_sums_{card}", labels, values, "GB/s read", f"push check bit sums, bf16 ({card})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
