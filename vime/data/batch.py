"""What the trainer gets: a batch of samples with advantages, refused when it is staler than the recipe allows;
and the prompt + reference-answer samples of the supervised warm start."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vime.algorithms.recipe import AlgorithmConfig, assign_advantages
from vime.data.source import PromptSource
from vime.types import Group, Sample


def training_batch(
    groups: list[Group], algo: AlgorithmConfig, version: str, max_staleness: int, max_len: int | None = None
) -> list[Sample]:
    samples = assign_advantages(groups, algo, max_len)
    sampled = (v for s in samples for v, m in zip(s.weight_versions, s.loss_mask) if m)  # not user/tool tokens
    stale = set(sampled) - {version}
    if stale and max_staleness == 0:
        raise RuntimeError(
            f"batch holds tokens from weight versions {sorted(stale)} but the trainer is at "
            f"{version!r}; allow it with loop.max_staleness"
        )
    return samples


def kl_in_reward(
    batch: list[Sample], policy: list[list[float]], ref: list[list[float]], algo: AlgorithmConfig, max_len: int
) -> None:
    """REINFORCE++'s KL: each sampled token's reward loses kl_coef x KL(policy || reference), and the advantages
    are estimated again from those token rewards (groups keep their members' order)."""
    import torch

    from vime.algorithms.kl import kl_term

    penalty = {
        id(s): (algo.kl_coef * kl_term(torch.tensor(p), torch.tensor(r), algo.kl_estimator)).tolist()
        for s, p, r in zip(batch, policy, ref)
    }
    groups: dict[str, list[Sample]] = {}
    for s in batch:
        groups.setdefault(s.group_id, []).append(s)
    assign_advantages(list(groups.values()), algo, max_len, [penalty[id(s)] for g in groups.values() for s in g])


def sft_samples(source: PromptSource, n: int, encode: Callable[[Any], list[int]], tokenizer: Any) -> list[Sample]:
    """Prompt + reference answer + EOS, for the supervised warm start."""
    eos = tokenizer.eos_token_id
    out = []
    for rec in source.next_batch(n):
        resp = [*tokenizer.encode(str(rec["label"]), add_special_tokens=False), eos]
        out.append(Sample(prompt_ids=encode(rec["prompt"]), response_ids=resp, logprobs=[0.0] * len(resp)))
    return out
