"""Token log-probs and entropy from vocab-parallel logits (each TP rank holds V/TP columns).

Written out instead of using `vocab_parallel_cross_entropy` because that one subtracts the max from its input
in place, and we need the entropy of the same distribution as well. The TP sums use Megatron's autograd-aware
reduction (all-reduce forward, identity backward), so gradients are exact.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                         with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region as tp_sum

    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    v_local = logits.shape[-1]
    with torch.no_grad():
        m = logits.max(-1).values
        if ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    shifted = logits - m.unsqueeze(-1)
    lse = torch.log(tp_sum(shifted.exp().sum(-1)))
    local = targets - ps.get_tensor_model_parallel_rank() * v_local
    inside = (local >= 0) & (local < v_local)
    picked = shifted.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1) * inside
    logp = tp_sum(picked) - lse
    entropy = None
    if with_entropy:
        with torch.no_grad():
            p = torch.exp(shifted - lse.unsqueeze(-1))
            entropy = lse - tp_sum((p * shifted).sum(-1))
    return logp, entropy
