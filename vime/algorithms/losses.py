"""Per-token policy losses, registered by name (`algorithm.loss`).

Each takes the current log-probs `logp` [b, s] and the micro-batch tensors `mb` (same shape, aligned on the
position that predicts each token: `advantages`, `old_logprobs`, `loss_mask`, and `ref_logprobs` when a KL term is
on) and returns a per-token loss plus per-token metrics. The trainer weights them by the aggregation mode
(`vime/algorithms/aggregation.py`) over the global batch, so a loss never sees padding, TP or micro-batching.
Every metric a loss returns is logged as `train/<name>`: the token mean over the batch, or, for a name ending in
`_max`, the batch's maximum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vime.algorithms.kl import kl_term
from vime.registry import Registry

LossOut = tuple[Tensor, dict[str, Tensor]]


def sft_loss(logp: Tensor, mb: dict[str, Tensor], **_: Any) -> LossOut:
    return -logp, {}


def old_of(logp: Tensor, mb: dict[str, Tensor]) -> Tensor:
    """The behaviour policy's log-probs; without them a single on-policy update (ratio 1)."""
    old = mb.get("old_logprobs")
    return logp.detach() if old is None else old


def with_kl(loss: Tensor, logp: Tensor, mb: dict[str, Tensor], metrics: dict[str, Tensor], **kw: Any) -> LossOut:
    """Adds `kl_coef * KL(policy || reference)` per token when a reference is present (algorithm.kl_coef > 0)."""
    if kw.get("kl_coef") and "ref_logprobs" in mb:
        kl = kl_term(logp, mb["ref_logprobs"], kw.get("kl_estimator", "k3"))
        loss = loss + kw["kl_coef"] * kl
        metrics["kl_ref"] = kl.detach()
    return loss, metrics


def ppo_loss(
    logp: Tensor,
    mb: dict[str, Tensor],
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    **kw: Any,
) -> LossOut:
    """PPO-clip. `clip_high > clip_low` is DAPO's clip-higher; `dual_clip` (c > 1, e.g. 3) bounds the loss of a
    negative-advantage token whose ratio has run away (dual-clip PPO)."""
    adv = mb["advantages"]
    ratio = torch.exp(logp - old_of(logp, mb))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    metrics = {
        "clip_frac": (clipped > unclipped).float().detach(),
        "ratio": ratio.detach(),
        "ratio_max": ratio.detach(),
    }
    if dual_clip is not None:
        bounded = torch.minimum(loss, -adv * dual_clip)
        metrics["dual_clip_frac"] = ((adv < 0) & (bounded < loss)).float().detach()
        loss = torch.where(adv < 0, bounded, loss)
    return with_kl(loss, logp, mb, metrics, **kw)


def gspo_loss(
    logp: Tensor,
    mb: dict[str, Tensor],
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    **kw: Any,
) -> LossOut:
    """GSPO: one importance ratio per sequence, the geometric mean of its token ratios, clipped as a whole (so the
    clip range is far narrower than PPO's). Per token it is `sg[s_i] * exp(logp - sg[logp])`: the value is the
    sequence ratio, the gradient flows through each token's log-prob."""
    mask = mb["loss_mask"].float()
    log_ratio = (logp - old_of(logp, mb)) * mask
    seq = torch.exp(log_ratio.sum(-1) / mask.sum(-1).clamp(min=1))
    ratio = seq.detach()[:, None] * torch.exp(logp - logp.detach())
    adv = mb["advantages"]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    metrics = {"clip_frac": (clipped > unclipped).float().detach(), "ratio": ratio.detach()}
    return with_kl(loss, logp, mb, metrics, **kw)


def cispo_loss(
    logp: Tensor,
    mb: dict[str, Tensor],
    *,
    clip_low: float = 1.0,
    clip_high: float = 0.28,
    **kw: Any,
) -> LossOut:
    """CISPO (MiniMax-M1): the importance weight is clipped and detached, and multiplies a REINFORCE term, so no
    token's gradient is ever dropped (PPO's clip zeroes it). `clip_low` 1.0 leaves the lower side open."""
    ratio = torch.exp(logp - old_of(logp, mb)).detach()
    weight = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = -mb["advantages"] * weight * logp
    metrics = {"clip_frac": (weight != ratio).float(), "ratio": ratio}
    return with_kl(loss, logp, mb, metrics, **kw)


def reinforce_loss(logp: Tensor, mb: dict[str, Tensor], **kw: Any) -> LossOut:
    """Plain policy gradient, no ratio (on-policy by construction; REINFORCE++ and RLOO use it)."""
    return with_kl(-mb["advantages"] * logp, logp, mb, {}, **kw)


def entropy_bonus(loss: Tensor, entropy: Tensor | None, coef: float) -> Tensor:
    """`- coef * H` per token (the entropy of the policy's distribution at that position, differentiable): a
    positive coef keeps exploration up; applied by the trainer to whichever loss the recipe names."""
    if not coef or entropy is None:
        return loss
    return loss - coef * entropy


LOSSES: Registry[Callable[..., LossOut]] = Registry(
    "loss",
    "algorithm.loss",
    {
        "sft": sft_loss,
        "ppo": ppo_loss,
        "policy": ppo_loss,  # the name recipes used before there was more than one
        "gspo": gspo_loss,
        "cispo": cispo_loss,
        "reinforce": reinforce_loss,
    },
    n_args=2,
)


def get_loss(name: str) -> Callable[..., LossOut]:
    return LOSSES.get(name)
