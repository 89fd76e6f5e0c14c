"""Advantage estimators as plain tensor functions, registered by name (`algorithm.estimator`).

Every estimator has one signature, so a recipe switches between them with a word:

    (rewards, mask, group_ids, values=None, **params) -> (advantages [B, T], returns [B, T])

`rewards` is [B] (one outcome per response: it counts at the response's last token) or [B, T] (per-token rewards,
e.g. an outcome plus a KL penalty per token); `mask` [B, T] is 1 on the response tokens the policy sampled (tool
output and padding are 0); `group_ids` [B] says which responses answer the same prompt; `values` [B, T] is the
critic's estimate, where there is one. Outputs are 0 wherever `mask` is 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from vime.registry import Registry

Estimator = Callable[..., tuple[Tensor, Tensor]]


def token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """[B] outcomes → [B, T] with each outcome on its response's last sampled token; [B, T] passes through."""
    if rewards.dim() == 2:
        return rewards * mask
    out = torch.zeros_like(mask, dtype=torch.float32)
    has = mask.sum(-1) > 0
    last = (mask.shape[1] - 1 - torch.flip(mask, [1]).float().argmax(-1)).long()
    out[has, last[has]] = rewards[has].float()
    return out


def outcome(rewards: Tensor, mask: Tensor) -> Tensor:
    """One number per response: the outcome, or the sum of its token rewards."""
    return rewards.float() if rewards.dim() == 1 else (rewards * mask).sum(-1).float()


def group_stats(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per response: its group's mean, its group's size, and its group's sum (each broadcast back to [B])."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    n = torch.zeros(int(inv.max()) + 1 if inv.numel() else 0).index_add_(0, inv, torch.ones_like(scores))
    total = torch.zeros_like(n).index_add_(0, inv, scores)
    return (total / n)[inv], n[inv], total[inv]


def group_std(scores: Tensor, group_ids: Tensor, unbiased: bool) -> Tensor:
    mean, n, _ = group_stats(scores, group_ids)
    _, inv = torch.unique(group_ids, return_inverse=True)
    sq = torch.zeros(int(inv.max()) + 1 if inv.numel() else 0).index_add_(0, inv, (scores - mean) ** 2)[inv]
    denom = (n - 1).clamp(min=1) if unbiased else n
    return torch.where(n > 1, (sq / denom).sqrt(), torch.zeros_like(sq))


def broadcast(per_response: Tensor, mask: Tensor) -> Tensor:
    return per_response[:, None].float() * mask


def grpo(
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    std: Literal["unbiased", "population", "none"] = "unbiased",
    eps: float = 1e-6,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    """Group-relative: the outcome minus its group's mean, divided by the group's std. `unbiased` (n-1) is what
    verl's and slime's GRPO use (torch.std); `population` (n) is the other convention; `none` is Dr. GRPO.
    A group of one, or with all-equal rewards, gets advantage 0 (nothing to prefer)."""
    r = outcome(rewards, mask)
    mean, _, _ = group_stats(r, group_ids)
    adv = r - mean
    if std != "none":
        adv = adv / (group_std(r, group_ids, unbiased=std == "unbiased") + eps)
    return broadcast(adv, mask), broadcast(r, mask)


def dr_grpo(
    rewards: Tensor, mask: Tensor, group_ids: Tensor, values: Tensor | None = None, **kw: Any
) -> tuple[Tensor, Tensor]:
    """Dr. GRPO: the mean is subtracted, the std is not divided (it biases towards easy and hard prompts)."""
    return grpo(rewards, mask, group_ids, values, **{**kw, "std": "none"})


def rloo(
    rewards: Tensor, mask: Tensor, group_ids: Tensor, values: Tensor | None = None, **_: Any
) -> tuple[Tensor, Tensor]:
    """REINFORCE leave-one-out: each response's baseline is the mean of the *other* responses to its prompt
    (= n/(n-1) times the mean-centred reward). A group of one has no baseline: advantage 0."""
    r = outcome(rewards, mask)
    _, n, total = group_stats(r, group_ids)
    adv = torch.where(n > 1, r - (total - r) / (n - 1).clamp(min=1), torch.zeros_like(r))
    return broadcast(adv, mask), broadcast(r, mask)


def discounted_returns(tok: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_{t+1}, over the masked tokens of each response (masked positions carry nothing)."""
    out = torch.zeros_like(tok, dtype=torch.float32)
    running = torch.zeros(tok.shape[0])
    for t in range(tok.shape[1] - 1, -1, -1):
        running = torch.where(mask[:, t] > 0, tok[:, t] + gamma * running, running)  # tool tokens pass it on
        out[:, t] = running
    return out * mask


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Zero mean, unit std over the masked tokens of the whole batch."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def reinforce_plus_plus(
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++: per-token discounted returns (outcome at the last token, plus any per-token rewards such as a
    KL penalty), whitened over the batch's tokens: the batch is the baseline."""
    returns = discounted_returns(token_rewards(rewards, mask), mask, gamma)
    return whiten(returns, mask), returns


def reinforce_plus_plus_baseline(
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline: the group mean is subtracted from each outcome first, then as `reinforce_plus_plus`."""
    r = outcome(rewards, mask)
    mean, _, _ = group_stats(r, group_ids)
    tok = token_rewards(r - mean, mask)
    if rewards.dim() == 2:  # per-token terms beyond the outcome (a KL penalty) stay where they are
        tok = tok + (rewards - token_rewards(outcome(rewards, mask), mask)) * mask
    return reinforce_plus_plus(tok, mask, group_ids, gamma=gamma)


def gae(
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = False,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the sampled tokens (PPO with a critic); returns = advantages + values
    (before whitening: the critic's targets). Tokens with mask 0 inside a response (tool output) are skipped: the
    next sampled token's value bootstraps. `whiten_advantages`: over the batch's tokens, as verl's PPO does."""
    if values is None:
        raise ValueError("algorithm.estimator=gae needs a critic's values (a 'critic:' section)")
    tok = token_rewards(rewards, mask)
    adv = torch.zeros_like(tok, dtype=torch.float32)
    next_value = torch.zeros(tok.shape[0])
    running = torch.zeros(tok.shape[0])
    for t in range(tok.shape[1] - 1, -1, -1):
        m = mask[:, t].float()
        delta = tok[:, t] + gamma * next_value - values[:, t]
        new = delta + gamma * lam * running
        running = m * new + (1 - m) * running
        next_value = m * values[:, t] + (1 - m) * next_value
        adv[:, t] = running
    adv = adv * mask
    returns = (adv + values) * mask
    return (whiten(adv, mask) if whiten_advantages else adv), returns


ESTIMATORS: Registry[Estimator] = Registry(
    "advantage estimator",
    "algorithm.estimator",
    {
        "grpo": grpo,
        "dr_grpo": dr_grpo,
        "rloo": rloo,
        "reinforce_plus_plus": reinforce_plus_plus,
        "reinforce_plus_plus_baseline": reinforce_plus_plus_baseline,
        "gae": gae,
    },
    n_args=3,
)
