"""KL(policy || reference) per token, from log-probs of the sampled tokens (Schulman's estimators).

k1 = log(p/q) is unbiased but can be negative per token; k2 = ½ log²(p/q) is what the gradient of a squared error
gives; k3 = q/p - 1 - log(q/p) is unbiased, never negative, and has the lowest variance (the default). Used as a loss
term (`algorithm.kl_coef`) or, with REINFORCE++, as a per-token reward penalty (`algorithm.kl_in_reward`).
"""

from __future__ import annotations

import torch

from vime.algorithms.recipe import KLEstimator


def kl_term(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"algorithm.kl_estimator={estimator!r}: use k1, k2 or k3")
