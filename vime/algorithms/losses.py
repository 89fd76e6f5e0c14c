"""Per-token losses. Each takes the current log-probs `logp` [b, s] and the micro-batch tensors (same shape,
aligned on the position that predicts each token) and returns a per-token loss plus per-token metrics; the
trainer masks, sums and normalises them, so a loss never needs to know about padding, TP or micro-batching.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vime.registry import Registry

LossOut = tuple[torch.Tensor, dict[str, torch.Tensor]]


def sft_loss(logp: torch.Tensor, mb: dict[str, torch.Tensor], **_: Any) -> LossOut:
    return -logp, {}


def policy_loss(
    logp: torch.Tensor,
    mb: dict[str, torch.Tensor],
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    **_: Any,
) -> LossOut:
    """PPO-clip surrogate (GRPO/DAPO use it with group-relative advantages; DAPO sets clip_high > clip_low).
    `old_logprobs` defaults to the current ones (a single on-policy update: ratio 1, plain policy gradient)."""
    old = mb.get("old_logprobs")
    old = logp.detach() if old is None else old
    adv = mb["advantages"]
    ratio = torch.exp(logp - old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    metrics = {"clip_frac": (clipped > unclipped).float().detach(), "ratio": ratio.detach()}
    if kl_coef and "ref_logprobs" in mb:
        d = mb["ref_logprobs"] - logp
        kl = torch.exp(d) - d - 1  # k3 estimator, >= 0
        loss = loss + kl_coef * kl
        metrics["kl_ref"] = kl.detach()
    return loss, metrics


LOSSES: Registry[Callable[..., LossOut]] = Registry(
    "loss", "algorithm.loss", {"sft": sft_loss, "policy": policy_loss}, n_args=2
)


def get_loss(name: str) -> Callable[..., LossOut]:
    return LOSSES.get(name)
