"""How per-token losses become one number: a weight per token, computed from counts over the *global* batch.

Writing each mode as token weights (loss = Σ w·ℓ) is what makes it exact under micro-batching and data parallelism:
each micro-batch contributes its tokens with weights that already divide by the global token or sequence count, so
the sum over micro-batches and ranks is the loss of the whole batch, never a mean of means.

- `token-mean`: every sampled token counts the same (DAPO's choice; long responses weigh more).
- `seq-mean-token-sum`: sum over a response's tokens, mean over responses.
- `seq-mean-token-mean`: mean within each response, then over responses (GRPO as first published).
- `seq-mean-token-sum-norm`: sum over tokens divided by a constant length (`max_len`) and the response count
  (Dr. GRPO: no length bias in either direction).
"""

from __future__ import annotations

import torch

from vime.algorithms.recipe import MODES


def token_weights(
    mask: torch.Tensor, mode: str, *, n_tokens: float, n_seqs: float, max_len: float | None = None
) -> torch.Tensor:
    """[B, T] weights for this micro-batch's tokens; `n_tokens` / `n_seqs` count the whole batch (masked tokens,
    responses with at least one)."""
    m = mask.float()
    if mode == "token-mean":
        return m / max(1.0, n_tokens)
    if mode == "seq-mean-token-sum":
        return m / max(1.0, n_seqs)
    if mode == "seq-mean-token-mean":
        return m / m.sum(-1, keepdim=True).clamp(min=1) / max(1.0, n_seqs)
    if mode == "seq-mean-token-sum-norm":
        if not max_len:
            raise ValueError("aggregation seq-mean-token-sum-norm needs max_len (the response length budget)")
        return m / (max_len * max(1.0, n_seqs))
    raise ValueError(f"algorithm.aggregation={mode!r}: use one of {', '.join(MODES)}")


def aggregate(tok: torch.Tensor, mask: torch.Tensor, mode: str, max_len: float | None = None) -> torch.Tensor:
    """The loss of one whole batch (all of it in hand): Σ w·ℓ with the batch's own counts."""
    n_seqs = float((mask.sum(-1) > 0).sum())
    return (tok * token_weights(mask, mode, n_tokens=float(mask.sum()), n_seqs=n_seqs, max_len=max_len)).sum()
