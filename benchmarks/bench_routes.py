"""Routed experts per sample (R3): `python benchmarks/bench_routes.py [--samples 4 --positions 4096]`.

A batch of MoE samples at DeepSeek-V3's routing shape (61 layers × top-8 of 256 experts) held as vime holds them
now, one int16 array per sample (`vime.types.Routes`), against the baseline, the nested Python lists
(`[position][layer][k]`) samples carried before: the memory the batch's routes take, their pickle (what Ray ships
to each trainer rank), a pickle round trip, and the trainer's [b, s, layers, k] tensor (`engine_routes`). Writes
benchmarks/results/routes_<card>.{json,png}.
"""

from __future__ import annotations

import argparse
import gc
import pickle
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def held_bytes(make: Callable[[], Any]) -> tuple[Any, int]:
    """What building `make()` leaves allocated (tracemalloc: Python objects and numpy buffers alike)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    obj = make()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return obj, after - before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from benchmarks.common import bar_png, card_slug, write
    from trainers.megatron.batching import engine_routes

    rng = np.random.default_rng(0)
    shape = (a.positions, a.layers, a.k)
    source = [rng.integers(0, a.experts, size=shape, dtype=np.int16) for _ in range(a.samples)]
    rows: dict[str, dict[str, float]] = {}
    for name, make in (("arrays", lambda: [s.copy() for s in source]), ("lists", lambda: [s.tolist() for s in source])):
        batch, nbytes = held_bytes(make)
        blob = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        rows[name] = {
            "held_mb": nbytes / 2**20,
            "pickle_mb": len(blob) / 2**20,
            "pickle_roundtrip_s": timed(
                lambda b=batch: pickle.loads(pickle.dumps(b, protocol=pickle.HIGHEST_PROTOCOL))
            ),
            "trainer_tensor_s": timed(lambda b=batch: engine_routes([{"routed_experts": r} for r in b], a.positions)),
        }
        del batch, blob
        print(f"{name:>7}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[name].items()), flush=True)
    ratios = {k: rows["arrays"][k] / rows["lists"][k] for k in rows["arrays"]}
    print("arrays / lists: " + ", ".join(f"{k} {v:.4f}" for k, v in ratios.items()))
    card = card_slug()
    write(
        f"routes_{card}",
        {
            "shape_per_sample": list(shape),
            "samples": a.samples,
            "baseline": "nested lists",
            "rows": rows,
            "ratio_arrays_vs_lists": ratios,
        },
    )
    labels = [f"{k}\n{n}" for k in ("held_mb", "pickle_mb") for n in ("arrays", "lists")]
    bar_png(
        f"routes_{card}",
        labels,
        [rows[n][k] for k in ("held_mb", "pickle_mb") for n in ("arrays", "lists")],
        "MB",
        f"routes of {a.samples} samples, {a.positions}x{a.layers}x{a.k} each ({card})",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
