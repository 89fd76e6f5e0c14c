"""vime's log-prob function against plain fp32 `log_softmax` on the same logits, in a one-rank Megatron process
group — shared by the CPU test (small vocabulary) and the GPU test (Qwen2.5's vocabulary, bf16)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_rank() -> Iterator[None]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from vime.placement import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def both(
    base: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    temperature: float,
    entropy_weights: torch.Tensor | None = None,
) -> tuple[dict, dict]:
    """(vime, reference), each {logp, entropy, grad} for the loss Σ weights·logp (+ Σ entropy_weights·entropy: an
    entropy bonus); the grad has the logits' dtype."""
    from trainers.megatron.logprobs import logprobs_and_entropy

    x, ref_x = base.clone().requires_grad_(), base.clone().requires_grad_()
    logp, ent = logprobs_and_entropy(x, targets, temperature)
    assert ent is not None
    loss = (logp * weights).sum()
    ref_all = torch.log_softmax(ref_x.float() / temperature, -1)
    ref = ref_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref_ent = -(ref_all.exp() * ref_all).sum(-1)
    ref_loss = (ref * weights).sum()
    if entropy_weights is not None:
        loss, ref_loss = loss + (ent * entropy_weights).sum(), ref_loss + (ref_ent * entropy_weights).sum()
    loss.backward()
    ref_loss.backward()
    assert torch.equal(x.detach(), base)  # the caller's logits are never overwritten
    return (
        {"logp": logp.detach(), "entropy": ent.detach(), "grad": x.grad},
        {"logp": ref.detach(), "entropy": ref_ent.detach(), "grad": ref_x.grad},
    )
