"""Megatron trainer throughput on this machine: train tokens/s for the tiny and the ~24M model, TP=1 vs TP=2,
measured in the same run (ranks are Ray actors, gloo on CPU)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bar_png, write


def samples(n: int, length: int, vocab: int = 500):
    import torch

    from vime.types import Sample

    g = torch.Generator().manual_seed(0)
    p = length // 4
    return [
        Sample(
            prompt_ids=torch.randint(3, vocab, (p,), generator=g).tolist(),
            response_ids=torch.randint(3, vocab, (length - p,), generator=g).tolist(),
            logprobs=[0.0] * (length - p),
            advantage=1.0 if i % 2 else -1.0,
        )
        for i in range(n)
    ]


def measure(model_path: str, tp: int, batch, steps: int) -> dict[str, float]:
    from trainers.megatron.trainer import MegatronTrainer
    from vime.trainer import TrainerConfig

    with MegatronTrainer(TrainerConfig(tp=tp, world_size=tp, micro_batch_size=4, lr=1e-5), model_path=model_path) as tr:
        tr.train_step(batch, "policy")  # warm-up
        t = time.perf_counter()
        for _ in range(steps):
            tr.train_step(batch, "policy")
        dt = (time.perf_counter() - t) / steps
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in batch)
    return {"seconds_per_step": dt, "tokens_per_step": tokens, "tokens_per_s": tokens / dt}


def main() -> None:
    from vime.models import make_model
    from vime.placement import RayConfig, ensure_ray

    ensure_ray(RayConfig(num_cpus=4))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, n, length, steps in (("tiny", 16, 256, 3), ("small", 8, 256, 2)):
            path = str(make_model("qwen2", size, Path(tmp) / size))
            batch = samples(n, length)
            for tp in (1, 2):
                r = {"model": f"qwen2-{size}", "tp": tp, **measure(path, tp, batch, steps)}
                rows.append(r)
                print(
                    f"{r['model']:12s} TP={tp}: {r['tokens_per_s']:8.0f} train tokens/s "
                    f"({r['seconds_per_step']:.2f} s/step)",
                    flush=True,
                )
    for size in ("tiny", "small"):
        a, b = (next(r for r in rows if r["model"] == f"qwen2-{size}" and r["tp"] == t) for t in (1, 2))
        print(f"qwen2-{size}: TP=2 / TP=1 throughput ratio {b['tokens_per_s'] / a['tokens_per_s']:.2f}")
    print("wrote", write("trainer_cpu", {"rows": rows}))
    bar_png(
        "trainer_cpu",
        [f"{r['model']}\nTP={r['tp']}" for r in rows],
        [r["tokens_per_s"] for r in rows],
        "train tokens/s",
        "Megatron-core trainer on CPU (fp32, gloo)",
    )


if __name__ == "__main__":
    main()
