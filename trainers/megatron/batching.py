"""Samples → padded micro-batches aligned for next-token prediction.

Position t of a sequence predicts token t+1, so response token j of a sample with a P-token prompt is scored
at position P-1+j. Every per-token field (loss mask, old/ref log-probs, advantages) is placed at that position,
which lets losses work on plain [b, s] tensors. Right padding plus the causal mask keeps pads out of real
positions; the loss mask keeps them out of the loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# micro-batch field <- sample field, one value per response token (`logprobs` are the engine's, as sampled;
# `returns` and `old_values` are the critic's targets and the values its advantages were computed with)
PER_TOKEN = {
    "old_logprobs": "old_logprobs",
    "ref_logprobs": "ref_logprobs",
    "rollout_logprobs": "logprobs",
    "returns": "returns",
    "old_values": "old_values",
}


def seq_len(s: dict[str, Any]) -> int:
    return len(s["prompt_ids"]) + len(s["response_ids"])


def make_microbatch(samples: list[dict[str, Any]], length: int) -> dict[str, torch.Tensor]:
    b = len(samples)
    tokens = torch.zeros(b, length, dtype=torch.long)
    targets = torch.zeros(b, length, dtype=torch.long)
    mask = torch.zeros(b, length)
    adv = torch.zeros(b, length)
    # a field is present when every real sample has it; the empty rows that pad the last micro-batch never do,
    # and must not switch it off for the real samples beside them (their ratio would silently become 1)
    real = [s for s in samples if s["response_ids"]]
    extra = {
        k: torch.zeros(b, length)
        for k, src in PER_TOKEN.items()
        if real and all(len(s.get(src) or []) == len(s["response_ids"]) for s in real)
    }
    for i, s in enumerate(samples):
        ids = list(s["prompt_ids"]) + list(s["response_ids"])
        n, p, r = len(ids), len(s["prompt_ids"]), len(s["response_ids"])
        tokens[i, :n] = torch.tensor(ids)
        targets[i, : n - 1] = torch.tensor(ids[1:])
        span = slice(p - 1, p - 1 + r)
        mask[i, span] = torch.tensor(s.get("loss_mask") or [1] * r, dtype=torch.float)
        per_token = s.get("token_advantages")  # estimators whose advantage varies along the response (GAE, discounts)
        adv[i, span] = torch.tensor(per_token, dtype=torch.float) if per_token else float(s.get("advantage", 0.0))
        for k, t in extra.items():
            if r:
                t[i, span] = torch.tensor(s[PER_TOKEN[k]], dtype=torch.float)
    routes = engine_routes(samples, length)
    return {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": mask,
        "advantages": adv,
        "position_ids": torch.arange(length).unsqueeze(0).expand(b, -1).contiguous(),
        **extra,
        **({"routes": routes} if routes is not None else {}),
    }


def engine_routes(samples: list[dict[str, Any]], length: int) -> torch.Tensor | None:
    """The experts the engine routed each position to, [b, s, layers, k] (int16; -1 where the engine gave
    none: padding, the last token, samples without routes, which the router then routes live), or None when no
    sample of the micro-batch has routes."""
    given = [None if g is None else np.asarray(g, dtype=np.int16) for g in (s.get("routed_experts") for s in samples)]
    first = next((g for g in given if g is not None and g.size), None)
    if first is None:
        return None
    out = torch.full((len(samples), length, *first.shape[1:]), -1, dtype=torch.int16)
    for i, g in enumerate(given):
        if g is not None and g.size:
            out[i, : len(g)] = torch.from_numpy(g)
    return out


def microbatches(
    samples: list[dict[str, Any]], micro_batch_size: int, pad_multiple: int = 8
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """One padded shape [micro_batch_size, length] for all micro-batches: pipeline stages exchange fixed shapes.
    The last micro-batch is filled with empty rows (loss mask 0), which `response_values` never reads."""
    length = max(seq_len(s) for s in samples)
    length = -(-length // pad_multiple) * pad_multiple
    filler = {"prompt_ids": [0], "response_ids": [], "loss_mask": []}
    rows = samples + [filler] * (-len(samples) % micro_batch_size)
    mbs = [make_microbatch(rows[i : i + micro_batch_size], length) for i in range(0, len(rows), micro_batch_size)]
    return mbs, length


def response_values(values: torch.Tensor, samples: list[dict[str, Any]]) -> list[list[float]]:
    """[b, s] position-aligned values → each sample's response-token values."""
    out = []
    for i, s in enumerate(samples):
        p, r = len(s["prompt_ids"]), len(s["response_ids"])
        out.append(values[i, p - 1 : p - 1 + r].tolist())
    return out
