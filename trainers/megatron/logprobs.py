"""Token log-probs and entropy from vocab-parallel logits (each TP rank holds V/TP columns).

With a real vocabulary (151,936 columns for Qwen2.5) the logits are the largest tensors of the step, so every
full-vocab pass counts: on an H100, vime's 0.5B step ran 12% behind bare Megatron-core, and the profile put the
extra kernel time in full-vocab copies and elementwise passes. Two things here remove them:

- `LogProbHead` takes the logits where Megatron's own cross-entropy does. Megatron's GPTModel returns logits as
  [b, s, V] through a transposed full copy, which `Float16Module` then upcasts to fp32 (two more full copies, and
  the same again in backward); given labels, it instead hands its [s, b, V] bf16 logits to
  `compute_language_model_loss`, and only the [b, s] result is transposed and upcast.
- `_VocabParallelLogProb` is one autograd function in the manner of Megatron's `vocab_parallel_cross_entropy`
  (which gives no entropy of the same distribution, so we cannot use it as is): the fp32 shifted logits are made
  in one pass from the bf16 ones, the softmax is built in place and is the only [.., V] tensor kept for
  backward, and the backward (`onehot - softmax`) is written straight into the input's dtype.

TP: the max, the exp-sum, the picked logit and the entropy term are summed over the TP group in the forward; the
backward needs no communication (the global softmax restricted to local columns is the local gradient).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def _tp_all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(t, op=op, group=ps.get_tensor_model_parallel_group())
    return t


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,  # type: ignore[override]
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from megatron.core import parallel_state as ps

        v_local = logits.shape[-1]
        top = _tp_all_reduce(logits.max(-1).values.float(), dist.ReduceOp.MAX)
        x = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        torch.sub(logits, top.unsqueeze(-1), out=x)  # the fp32 shifted logits in one pass over the bf16 ones
        if temperature != 1.0:
            x.div_(temperature)
        local = targets - ps.get_tensor_model_parallel_rank() * v_local
        inside = (local >= 0) & (local < v_local)
        local = local.clamp(0, v_local - 1)
        picked = _tp_all_reduce(x.gather(-1, local.unsqueeze(-1)).squeeze(-1) * inside)
        if with_entropy:  # entropy = lse - Σ p·shifted, with Σ e^s·s taken in the shifted logits' own buffer
            e = x.exp()
            e_s = _tp_all_reduce(x.mul_(e).sum(-1))
            x = e
        else:
            x.exp_()
        sumexp = _tp_all_reduce(x.sum(-1))
        lse = sumexp.log()
        logp = picked - lse
        entropy = lse - e_s / sumexp if with_entropy else torch.zeros_like(lse)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)  # an entropy no loss term uses gets no gradient pass at all
        if ctx.needs_input_grad[0]:  # a forward-only pass (old/ref log-probs) keeps nothing
            x.div_(sumexp.unsqueeze(-1))  # softmax
            ctx.save_for_backward(x, local, inside, entropy)
            ctx.temperature, ctx.dtype = temperature, logits.dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp: torch.Tensor | None, g_entropy: torch.Tensor | None):  # type: ignore[override]
        softmax, local, inside, entropy = ctx.saved_tensors
        # d/ds with s = logits / T: d logp = onehot - p; dH = -p (log p + H), per local column
        bonus = None
        if g_entropy is not None:  # only with an entropy term in the loss (it costs one more [.., V] tensor)
            bonus = (torch.xlogy(softmax, softmax) + softmax * entropy.unsqueeze(-1)) * g_entropy.unsqueeze(-1)
        grad = softmax.scatter_add_(-1, local.unsqueeze(-1), -inside.unsqueeze(-1).to(softmax.dtype))  # p - onehot
        g = torch.zeros_like(entropy) if g_logp is None else g_logp
        out = torch.empty(grad.shape, dtype=ctx.dtype, device=grad.device)  # the product lands in the input dtype
        if bonus is None:
            return torch.mul(grad, -g.unsqueeze(-1) / ctx.temperature, out=out), None, None, None
        grad.mul_(g.unsqueeze(-1)).add_(bonus)
        return torch.mul(grad, -1.0 / ctx.temperature, out=out), None, None, None


def logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) per position [..] and the entropy of the same distribution (None when not asked for), both
    differentiable: the entropy is a metric unless a loss adds an entropy bonus."""
    logp, entropy = _VocabParallelLogProb.apply(logits, targets, temperature, with_entropy)
    return logp, entropy if with_entropy else None


class LogProbHead:
    """Stands in for a GPTModel's `compute_language_model_loss(labels, logits)`: the model, called with
    `labels=targets`, then returns per-token log-probs [b, s] instead of logits. What a call needs besides
    (temperature, entropy or not, a look at the logits) is set on the head before the forward; the entropy of
    the last call is left in `entropy`."""

    def __init__(self) -> None:
        self.temperature = 1.0
        self.with_entropy = True
        self.on_logits: Callable[[torch.Tensor], Any] | None = None
        self.entropy: torch.Tensor | None = None

    def __call__(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.on_logits is not None:
            self.on_logits(logits.transpose(0, 1))  # [b, s, V/TP]
        logp, ent = logprobs_and_entropy(logits, labels.t(), self.temperature, self.with_entropy)
        self.entropy = None if ent is None else ent.t()
        return logp.t()

    @classmethod
    def install(cls, gpt_model: torch.nn.Module) -> LogProbHead:
        head = cls()
        gpt_model.compute_language_model_loss = head  # an instance attribute shadows the method
        return head
