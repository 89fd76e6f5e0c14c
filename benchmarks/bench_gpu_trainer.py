"""Megatron trainer throughput on one GPU: vime's trainer (Ray actor, vime's loss and log-prob code) vs a bare
Megatron-core loop over the same GPTModel spec (its own fused vocab-parallel cross-entropy), same shapes and
tokens, same run. A third path runs vime's worker in its own process without Ray (the same step code, no actor
round trip, no sample serialisation), which splits the gap between the two. VIME_PROFILE=1 also writes the top
CUDA kernels of two steps of the bare and in-process paths (torch.profiler) next to the JSON.
`python benchmarks/bench_gpu_trainer.py [model_dir]` (default models/qwen2-0.5b)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bar_png, exit_on_sigterm, write

SEQ, MICRO, N_MICRO, WARMUP, STEPS = 1024, 4, 4, 3, 6


def tokens(vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(3, min(vocab, 500), (MICRO * N_MICRO, SEQ), generator=g)


def config_and_samples(model_dir: str) -> tuple:
    """vime's trainer config and the step's samples (the same tokens as the bare run), for both vime paths."""
    from transformers import AutoConfig

    from vime.trainer import TrainerConfig
    from vime.types import Sample

    rows = tokens(AutoConfig.from_pretrained(model_dir).vocab_size).tolist()
    cfg = TrainerConfig(world_size=1, gpus_per_rank=1, dtype="bfloat16", lr=1e-5, micro_batch_size=MICRO)
    return cfg, [Sample(prompt_ids=r[:1], response_ids=r[1:], logprobs=[0.0] * (SEQ - 1)) for r in rows]


def bare(model_dir: str) -> None:
    """The baseline, in its own process: plain Megatron-core, no vime code on the step path except the spec."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module
    from transformers import AutoConfig

    from trainers.megatron.spec import build_model, transformer_config

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    ps.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    hf = AutoConfig.from_pretrained(model_dir)
    cfg = transformer_config(hf, tp=1, pp=1, dtype=torch.bfloat16, on_cpu=False)
    model = build_model(hf, cfg, pre_process=True, post_process=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = DistributedDataParallel(
        config=cfg,
        module=Float16Module(cfg, model.cuda()),
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
    )
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, bf16=True, clip_grad=1.0), [model])
    data = tokens(hf.vocab_size).cuda()
    pos = torch.arange(SEQ, device="cuda").unsqueeze(0).expand(MICRO, -1)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool, device="cuda"), 1)[None, None]

    def step() -> None:
        mbs = iter(data.split(MICRO))

        def forward_step(it, m):
            x = next(it)
            labels = torch.roll(x, -1, 1)
            out = m(input_ids=x, position_ids=pos, attention_mask=mask, labels=labels)
            return out, lambda o: (o.float().mean(), {})

        model.zero_grad_buffer()
        opt.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=mbs,
            model=[model],
            num_microbatches=N_MICRO,
            seq_length=SEQ,
            micro_batch_size=MICRO,
            forward_only=False,
        )
        opt.step()

    s = timed(step, "bare")
    print(f"BARE {s} {torch.cuda.max_memory_allocated() / 2**30}", flush=True)
    dist.destroy_process_group()


def timed(step, name: str) -> float:
    """Median seconds of STEPS steps after WARMUP, GPU synchronised; optionally a kernel profile of two more."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for i in range(WARMUP + STEPS):
        sync()
        t = time.perf_counter()
        step()
        sync()
        if i >= WARMUP:
            times.append(time.perf_counter() - t)
    if os.environ.get("VIME_PROFILE"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            sync()
        out = Path(os.environ.get("VIME_BENCH_OUT", Path(__file__).resolve().parent / "results"))
        (out / f"gpu_trainer_profile_{name}.txt").write_text(
            prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        )
    return statistics.median(times)


def inproc(model_dir: str) -> None:
    """vime's worker (its batching, loss and optimizer step) in this process: no Ray, no serialisation."""
    import torch

    from trainers.megatron.trainer import to_rank_dict
    from trainers.megatron.worker import MegatronWorker
    from vime.placement import free_port

    cfg, samples = config_and_samples(model_dir)
    rows = [to_rank_dict(x, {}) for x in samples]
    w = MegatronWorker(cfg.model_dump(), model_dir, 0, 1)
    w.setup("127.0.0.1", free_port())
    s = timed(lambda: w.train_step(rows, "sft", {}, 1.0), "inproc")
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    print(f"INPROC {s} {peak}", flush=True)
    torch.distributed.destroy_process_group()


def vime(model_dir: str) -> tuple[float, list[float]]:
    from vime.specs import make_trainer

    cfg, samples = config_and_samples(model_dir)
    trainer = make_trainer(cfg, model_dir)
    try:
        times = []
        for i in range(WARMUP + STEPS):
            t = time.perf_counter()
            trainer.train_step(samples, "sft")  # Ray round trip included: it is part of vime's step
            if i >= WARMUP:
                times.append(time.perf_counter() - t)
    finally:
        trainer.shutdown()
    return statistics.median(times), times


def subprocess_path(flag: str, model: str) -> tuple[float, float]:
    """Run one path in a fresh process (each owns its process group and GPU memory); (median step s, peak GiB)."""
    r = subprocess.run(
        [sys.executable, __file__, flag, model], capture_output=True, text=True, timeout=900, check=False
    )
    tag = flag.strip("-").upper() + " "
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith(tag)), None)
    if line is None:
        raise RuntimeError(f"{flag} run failed:\n{r.stderr[-3000:]}")
    step_s, mem = map(float, line.split()[1:])
    return step_s, mem


def main() -> None:
    import torch

    model = sys.argv[1] if len(sys.argv) > 1 else "models/qwen2-0.5b"
    out = Path(os.environ.get("VIME_BENCH_OUT", Path(__file__).resolve().parent / "results"))
    card = torch.cuda.get_device_name(0)
    bare_s, bare_mem = subprocess_path("--bare", model)
    inproc_s, _ = subprocess_path("--inproc", model)
    vime_s, vime_all = vime(model)
    n_tok = MICRO * N_MICRO * SEQ
    res = {
        "card": card,
        "model": model,
        "seq": SEQ,
        "micro_batch": MICRO,
        "micro_batches": N_MICRO,
        "bare_step_s": bare_s,
        "bare_tokens_per_s": n_tok / bare_s,
        "bare_peak_gib": bare_mem,
        "inproc_step_s": inproc_s,
        "inproc_tokens_per_s": n_tok / inproc_s,
        "vime_step_s": vime_s,
        "vime_tokens_per_s": n_tok / vime_s,
        "vime_steps_s": vime_all,
        "ratio": bare_s / vime_s,
        "ratio_inproc": bare_s / inproc_s,
    }
    print(
        f"bare Megatron-core {n_tok / bare_s:.0f} tok/s, vime worker in-process {n_tok / inproc_s:.0f} tok/s, "
        f"vime {n_tok / vime_s:.0f} tok/s, ratio {res['ratio']:.2f} (in-process {res['ratio_inproc']:.2f})"
    )
    write("gpu_trainer", res, out)
    bar_png(
        "gpu_trainer",
        ["bare Megatron-core", "vime worker, no Ray", "vime trainer"],
        [n_tok / bare_s, n_tok / inproc_s, n_tok / vime_s],
        "tokens/s",
        f"train step, {card} (ratio {res['ratio']:.2f})",
        out,
    )


if __name__ == "__main__":
    exit_on_sigterm()
    if sys.argv[1:2] == ["--bare"]:
        bare(sys.argv[2])
    elif sys.argv[1:2] == ["--inproc"]:
        inproc(sys.argv[2])
    else:
        main()
