"""What every rank of a train step must agree on: whether the step is taken (finite loss and gradients on all of
them), and the step's metrics (each loss metric's token mean over the whole batch, on every rank)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist


def all_finite(outs: list[dict[str, Any]], params: Iterable[torch.nn.Parameter], on_cpu: bool) -> bool:
    """Loss and gradients finite on every rank (each holds other shards; all must agree to step or skip).
    Megatron's fp32 and unscaled bf16 optimisers step on whatever the gradients hold."""
    local = all(bool(torch.isfinite(torch.as_tensor(o["loss_sum"])).all()) for o in outs if "loss_sum" in o)
    grads = [g for p in params if (g := getattr(p, "main_grad", p.grad)) is not None]
    if local and grads:
        local = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    bad = torch.tensor([0.0 if local else 1.0], device="cpu" if on_cpu else "cuda")
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def token_means(outs: list[dict[str, Any]], world_size: int, on_cpu: bool, pp: int) -> tuple[dict[str, float], float]:
    """Every `<name>_sum` a micro-batch returned, summed over the batch and divided by its masked tokens, and every
    `<name>_max` as the batch's maximum: (metrics by name, token count). All ranks reduce the same keys: those any
    rank's loss returned."""
    sums: dict[str, float] = {}
    maxima: dict[str, float] = {}
    for out in outs:
        for k, v in out.items():
            if k.endswith("_sum"):
                sums[k] = sums.get(k, 0.0) + float(v)
            elif k.endswith("_max"):
                maxima[k] = max(maxima.get(k, -math.inf), float(v))
    keys: list[list[str]] = [[] for _ in range(world_size)]
    dist.all_gather_object(keys, sorted([*sums, *maxima]))  # earlier pipeline stages return none
    names = {"loss_sum", "mask_sum", *(k for ks in keys for k in ks)}
    total = last_stage_reduce({k: sums.get(k, 0.0) for k in names if k.endswith("_sum")}, on_cpu, pp)
    n = max(1.0, total.pop("mask_sum"))
    peaks = last_stage_reduce({k: maxima.get(k, -math.inf) for k in names if k.endswith("_max")}, on_cpu, pp, True)
    return {k[:-4]: v / n for k, v in total.items()} | peaks, n


def last_stage_reduce(values: dict[str, float], on_cpu: bool, pp: int, peak: bool = False) -> dict[str, float]:
    """Sum (or, `peak`, take the max of) metrics over the DP ranks of the last pipeline stage, and hand them to
    every rank."""
    from megatron.core import parallel_state as ps

    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if not on_cpu:
        t = t.cuda()
    if not ps.is_pipeline_last_stage():
        t.fill_(-math.inf if peak else 0.0)
    op = dist.ReduceOp.MAX if peak else dist.ReduceOp.SUM
    dist.all_reduce(t, op=op, group=ps.get_data_parallel_group())
    if pp > 1:
        dist.all_reduce(t, op=op, group=ps.get_pipeline_model_parallel_group())
    return dict(zip(keys, t.tolist()))
