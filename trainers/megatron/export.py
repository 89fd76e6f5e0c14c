"""Weights out of a (TP/PP-sharded) Megatron rank group as HF-named full tensors, bucket by bucket.

Every rank walks the same parameter plan in the same order: the owning stage of replica 0 all-gathers a tensor
over TP (an expert over expert-parallel ranks), sends it to global rank 0 if it is on another stage, and rank 0
converts it to HF names. Only one bucket is materialised at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from trainers.megatron import adapter
from trainers.megatron.spec import num_experts


def local_state(w: Any) -> dict[str, torch.Tensor]:
    """This rank's state dict, built once: its tensors share storage with the parameters (updated in place by
    the optimiser), and rebuilding it per tensor costs more than the GPU copy of a whole push."""
    if getattr(w, "_state", None) is None:
        w._state = w.module().state_dict()
    return w._state


def param_plan(w: Any) -> list[tuple[int, str, str, list[int], str]]:
    """(stage, local name, global name, shape, dtype) for every parameter, identical on all ranks. The shape is
    the full one; an expert's is [ep, *shape] (its copies on all expert-parallel ranks, stacked) and its global
    name is expert-parallel rank 0's."""
    from megatron.core import parallel_state as ps

    if getattr(w, "_plan", None) is None:
        mine = []
        for name, t in local_state(w).items():
            if name.endswith("_extra_state"):
                continue
            shape = list(t.shape)
            dim = adapter.tp_dim(name)
            if dim is not None:
                shape[dim] *= w.cfg.tp
            if adapter.is_expert(name):
                shape = [w.cfg.ep, *shape]
            glob = adapter.local_to_global(name, w.pp_rank, w.layers_per_stage)
            mine.append((w.pp_rank, name, glob, shape, str(t.dtype).replace("torch.", "")))
        stages: list[Any] = [None] * w.cfg.pp
        dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
        w._plan = [p for st in stages for p in st]
    return w._plan


def _owned(w: Any, local_name: str) -> torch.Tensor | None:
    """This stage's full tensor: TP shards all-gathered, an expert's copies stacked over expert-parallel ranks.
    Dense tensors come from data-parallel replica 0, experts from expert-data-parallel replica 0 (with EP the
    expert-parallel ranks of replica 0 sit in different dense replicas); None on ranks that take no part."""
    from megatron.core import parallel_state as ps

    t = local_state(w)[local_name].detach()
    if adapter.is_expert(local_name):
        if ps.get_expert_data_parallel_rank() != 0:
            return None
        if w.cfg.ep == 1:
            return t[None]
        parts = [torch.empty_like(t) for _ in range(w.cfg.ep)]
        dist.all_gather(parts, t.contiguous(), group=ps.get_expert_model_parallel_group())
        return torch.stack(parts)
    if w.dp_rank != 0:
        return None
    if adapter.tp_dim(local_name) is not None and w.cfg.tp > 1:
        parts = [torch.empty_like(t) for _ in range(w.cfg.tp)]
        dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
        t = adapter.unshard(local_name, parts)
    return t


def gather_full(w: Any, stage: int, local_name: str, shape: list[int], dtype: str) -> torch.Tensor | None:
    """The full tensor on global rank 0 (None elsewhere): gathered on the owning stage, then p2p to stage 0
    within replica 0's pipeline."""
    from megatron.core import parallel_state as ps

    dev = "cpu" if w.on_cpu else "cuda"
    full: Any = _owned(w, local_name) if w.pp_rank == stage else None  # or filled by the receive below
    if stage != 0 and w.tp_rank == 0 and w.dp_rank == 0:
        pp_group = ps.get_pipeline_model_parallel_group()
        if w.pp_rank == stage:
            dist.send(full.contiguous(), dst=dist.get_global_rank(pp_group, 0))
        elif w.pp_rank == 0:
            full = torch.empty(shape, dtype=getattr(torch, dtype), device=dev)
            dist.recv(full, src=dist.get_global_rank(pp_group, stage))
    return full if w.rank == 0 else None


def named_parts(w: Any, glob: str, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Global Megatron names of a gathered tensor: one, or an expert's one per expert-parallel rank."""
    if not adapter.is_expert(glob):
        return [(glob, full)]
    per_rank = num_experts(w.hf_cfg) // w.cfg.ep
    return [(adapter.expert_to_global(glob, r, per_rank), part) for r, part in enumerate(full)]


def iter_hf_buckets(w: Any, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """HF-named full tensors in buckets of at most `bucket_bytes` (one tensor may exceed it alone).
    Every rank must drive this generator to the end; only global rank 0 gets tensors."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for stage, local, glob, shape, dtype in param_plan(w):
        full = gather_full(w, stage, local, shape, dtype)
        if full is None:
            continue
        for name, part in named_parts(w, glob, full):
            for hf_name, t in adapter.to_hf(name, part, w.hf_cfg):
                nbytes = t.numel() * t.element_size()
                if bucket and size + nbytes > bucket_bytes:
                    yield bucket
                    bucket, size = [], 0
                bucket.append((hf_name, t.contiguous()))
                size += nbytes
    if bucket:
        yield bucket
