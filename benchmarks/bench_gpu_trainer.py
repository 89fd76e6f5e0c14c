"""Megatron trainer throughput on one GPU: vime's trainer (Ray actor, vime's loss and log-prob code) vs a bare
Megatron-core loop over the same GPTModel spec (its own fused vocab-parallel cross-entropy), same shapes and
tokens, same run. `python benchmarks/bench_gpu_trainer.py [model_dir]` (default models/qwen2-0.5b)."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import exit_on_sigterm, bar_png, write  # noqa: E402

SEQ, MICRO, N_MICRO, WARMUP, STEPS = 1024, 4, 4, 3, 6


def tokens(vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(3, min(vocab, 500), (MICRO * N_MICRO, SEQ), generator=g)


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
    model = DistributedDataParallel(config=cfg, module=Float16Module(cfg, model.cuda()),
                                    ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
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
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=mbs, model=[model],
                                    num_microbatches=N_MICRO, seq_length=SEQ, micro_batch_size=MICRO,
                                    forward_only=False)
        opt.step()

    times = []
    for i in range(WARMUP + STEPS):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - t)
    s = statistics.median(times)
    print(f"BARE {s} {torch.cuda.max_memory_allocated() / 2**30}", flush=True)
    dist.destroy_process_group()


def vime(model_dir: str) -> tuple[float, list[float]]:
    import torch
    from transformers import AutoConfig

    from vime.trainer import TrainerConfig, make_trainer
    from vime.types import Sample

    hf = AutoConfig.from_pretrained(model_dir)
    data = tokens(hf.vocab_size).tolist()
    samples = [Sample(prompt_ids=row[:1], response_ids=row[1:], logprobs=[0.0] * (SEQ - 1)) for row in data]
    trainer = make_trainer(TrainerConfig(world_size=1, gpus_per_rank=1, dtype="bfloat16", lr=1e-5,
                                         micro_batch_size=MICRO), model_dir)
    try:
        times = []
        for i in range(WARMUP + STEPS):
            t = time.perf_counter()
            trainer.train_step(samples, "sft")  # Ray round trip included: it is part of vime's step
            if i >= WARMUP:
                times.append(time.perf_counter() - t)
    finally:
        trainer.shutdown()
    del torch
    return statistics.median(times), times


def main() -> None:
    import torch

    model = sys.argv[1] if len(sys.argv) > 1 else "models/qwen2-0.5b"
    out = Path(os.environ.get("VIME_BENCH_OUT", Path(__file__).resolve().parent / "results"))
    card = torch.cuda.get_device_name(0)
    r = subprocess.run([sys.executable, __file__, "--bare", model], capture_output=True, text=True, timeout=900)
    line = next((l for l in r.stdout.splitlines() if l.startswith("BARE ")), None)
    if line is None:
        raise RuntimeError(f"bare Megatron-core run failed:\n{r.stderr[-3000:]}")
    bare_s, bare_mem = map(float, line.split()[1:])
    vime_s, vime_all = vime(model)
    n_tok = MICRO * N_MICRO * SEQ
    res = {"card": card, "model": model, "seq": SEQ, "micro_batch": MICRO, "micro_batches": N_MICRO,
           "bare_step_s": bare_s, "bare_tokens_per_s": n_tok / bare_s, "bare_peak_gib": bare_mem,
           "vime_step_s": vime_s, "vime_tokens_per_s": n_tok / vime_s, "vime_steps_s": vime_all,
           "ratio": bare_s / vime_s}
    print(f"bare Megatron-core {n_tok / bare_s:.0f} tok/s, vime {n_tok / vime_s:.0f} tok/s, ratio {res['ratio']:.2f}")
    write("gpu_trainer", res, out)
    bar_png("gpu_trainer", ["bare Megatron-core", "vime trainer"], [n_tok / bare_s, n_tok / vime_s], "tokens/s",
            f"train step, {card} (ratio {res['ratio']:.2f})", out)


if __name__ == "__main__":
    exit_on_sigterm()
    if sys.argv[1:2] == ["--bare"]:
        bare(sys.argv[2])
    else:
        main()
