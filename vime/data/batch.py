"""What the trainer gets: a batch of samples with advantages, refused when a token is staler than the recipe allows;
and the prompt + reference-answer samples of the supervised warm start."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vime.algorithms.recipe import AlgorithmConfig, assign_advantages, estimate
from vime.data.source import PromptSource
from vime.staleness import check_bound, version_number
from vime.types import Group, Sample


def training_batch(
    groups: list[Group],
    algo: AlgorithmConfig,
    version: str,
    max_staleness: int,
    max_len: int | None = None,
    values_later: bool = False,
) -> list[Sample]:
    """`values_later`: the estimator needs a critic's values, which the update step gets (`reestimate`). Refused
    when any token the trainer would learn from was sampled more than `max_staleness` versions behind `version`."""
    samples = [s for g in groups for s in g] if values_later else assign_advantages(groups, algo, max_len)
    check_bound(samples, version_number(version), max_staleness)
    return samples


def kl_penalty(policy: list[list[float]], ref: list[list[float]], algo: AlgorithmConfig) -> list[list[float]]:
    """REINFORCE++'s KL in the reward: kl_coef x KL(policy || reference) per sampled token."""
    import torch

    from vime.algorithms.kl import kl_term

    return [
        (algo.kl_coef * kl_term(torch.tensor(p), torch.tensor(r), algo.kl_estimator)).tolist()
        for p, r in zip(policy, ref)
    ]


def reestimate(
    batch: list[Sample],
    algo: AlgorithmConfig,
    max_len: int,
    penalty: list[list[float]] | None = None,
    values: list[list[float]] | None = None,
) -> list[list[float]]:
    """Advantages again, from what only the trainer knows (a KL penalty taken off each token's reward, the
    critic's values); groups keep their members' order. Returns each sample's per-token returns, in batch order."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(batch):
        groups.setdefault(s.group_id, []).append(i)
    order = [i for g in groups.values() for i in g]

    def ordered(rows: list[list[float]] | None) -> list[list[float]] | None:
        return None if rows is None else [rows[i] for i in order]

    members = [[batch[i] for i in g] for g in groups.values()]
    _, returns = estimate(members, algo, max_len, ordered(penalty), ordered(values))
    out: list[list[float]] = [[] for _ in batch]
    for j, i in enumerate(order):
        out[i] = returns[j]
    return out


def sft_samples(source: PromptSource, n: int, encode: Callable[[Any], list[int]], tokenizer: Any) -> list[Sample]:
    """Prompt + reference answer + EOS, for the supervised warm start."""
    eos = tokenizer.eos_token_id
    out = []
    for rec in source.next_batch(n):
        resp = [*tokenizer.encode(str(rec["label"]), add_special_tokens=False), eos]
        out.append(Sample(prompt_ids=encode(rec["prompt"]), response_ids=resp, logprobs=[0.0] * len(resp)))
    return out
