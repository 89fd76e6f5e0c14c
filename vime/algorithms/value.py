"""The critic's loss, a per-token tensor function in the same shape as the policy losses (`losses.py`), so the
trainer aggregates it the same way: `values` [b, s] are the value head's outputs at the positions that predict
each response token (V of the state the token was sampled in), `mb` holds `returns`, `old_values` and `loss_mask`
on the same positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vime.algorithms.losses import LossOut


def clipped_value_loss(values: Tensor, mb: dict[str, Tensor], *, value_clip: float | None = 0.2, **_: Any) -> LossOut:
    """PPO's value loss, 0.5 (V - R)^2, clipped like the policy: a new value may not move more than `value_clip`
    from the value the advantages were computed with, or the larger of the two errors counts (None: unclipped)."""
    returns = mb["returns"]
    err = (values - returns) ** 2
    metrics = {"value": values.detach(), "value_error": (values - returns).abs().detach()}
    if value_clip is not None and "old_values" in mb:
        old = mb["old_values"]
        clipped = old + torch.clamp(values - old, -value_clip, value_clip)
        err_clipped = (clipped - returns) ** 2
        metrics["value_clip_frac"] = (err_clipped > err).float().detach()
        err = torch.maximum(err, err_clipped)
    return 0.5 * err, metrics
