"""Training–inference mismatch correction: the engine sampled with its own numerics (bf16 kernels, other
reductions), so its log-probs differ from the trainer's for the same weights, and a policy-gradient estimate built on
the engine's samples is off-policy by that much. Both corrections compare the trainer's old log-probs with the
engine's (`rollout_logprobs`), detached, and act on the per-token loss before aggregation:

- TIS (truncated importance sampling): weight each token's loss by w = π_old/π_engine, capped at `cap`; per token,
  or one weight per sequence (the product of its token ratios).
- MIS (masked importance sampling, IcePop): drop tokens (or whole sequences) whose ratio leaves [low, high];
  `geometric` judges a sequence by the geometric mean of its token ratios, so long responses are not all dropped.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

Level = Literal["token", "sequence", "geometric"]


def log_ratio(mb: dict[str, Tensor], level: str) -> Tensor:
    """log(π_old / π_engine) per token, or per sequence broadcast over its tokens."""
    mask = mb["loss_mask"].float()
    lr = (mb["old_logprobs"] - mb["rollout_logprobs"]) * mask
    if level == "token":
        return lr
    seq = lr.sum(-1, keepdim=True)
    if level == "geometric":
        seq = seq / mask.sum(-1, keepdim=True).clamp(min=1)
    return seq.expand_as(lr)


def correct(
    tok_loss: Tensor,
    mb: dict[str, Tensor],
    *,
    tis: dict[str, Any] | None = None,
    mis: dict[str, Any] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The per-token loss with TIS weights and MIS masking applied, and per-token metrics of what they did."""
    metrics: dict[str, Tensor] = {}
    if not (tis or mis) or "rollout_logprobs" not in mb or "old_logprobs" not in mb:
        return tok_loss, metrics
    with torch.no_grad():
        metrics["mismatch_abs_log_ratio"] = log_ratio(mb, "token").abs()
    if mis:
        with torch.no_grad():
            r = torch.exp(log_ratio(mb, mis.get("level", "token")))
            keep = ((r >= mis.get("low", 0.5)) & (r <= mis.get("high", 2.0))).float()
        tok_loss = tok_loss * keep
        metrics["mis_masked_frac"] = 1 - keep
    if tis:
        with torch.no_grad():
            level = tis.get("level", "token")
            w = torch.exp(log_ratio(mb, "token" if level == "token" else "sequence"))
            capped = torch.clamp(w, max=tis.get("cap", 2.0))
        tok_loss = tok_loss * capped
        metrics["tis_capped_frac"] = (w > capped).float()
        metrics["tis_weight"] = capped
    return tok_loss, metrics
