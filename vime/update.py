"""The updates of one rollout batch, in the order the algorithm needs them:

    trainer log-probs (old policy) → reference log-probs → critic values → advantages again (KL reward, GAE)
    → `ppo_epochs` passes of mini-batch steps (critic, then policy)

What the rollout could not know is filled in here, once per batch, before the first update: every epoch's ratio
has the same denominator, and the critic's targets are fixed while it learns them.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from vime.data.batch import kl_penalty, reestimate
from vime.parts import Parts
from vime.step_metrics import consistency
from vime.types import Sample

log = logging.getLogger(__name__)


def train_on(run: Parts, batch: list[Sample], T: float, step: int) -> dict[str, float]:
    algo = run.cfg.algorithm
    metrics = run.sync.release_engines()  # colocated on a GPU: the engines sleep while we train
    trainer_lp = run.trainer.logprobs(batch, T)
    metrics |= consistency(batch, trainer_lp)
    old = trainer_lp if algo.old_logprobs == "recompute" else [s.logprobs for s in batch]
    ref = run.trainer.logprobs(batch, T, reference=True) if algo.kl_coef else None
    values = run.critic.values(batch) if run.critic else None
    penalty = kl_penalty(trainer_lp, ref, algo) if ref is not None and algo.kl_in_reward else None
    returns = reestimate(batch, algo, run.cfg.rollout.max_tokens, penalty, values) if penalty or values else None
    kwargs = algo.loss_kwargs() | {"max_len": algo.max_len or run.cfg.rollout.max_tokens}
    policy_steps, critic_steps = [], []
    rng = random.Random(run.cfg.run.seed * 1_000_003 + step)  # the same order on resume
    for idx in updates(len(batch), algo.ppo_epochs, algo.mini_batch_size, rng if algo.shuffle else None):
        part = [batch[i] for i in idx]
        if run.critic and returns and values:
            critic_steps.append(run.critic.train_step(part, pick(returns, idx), pick(values, idx), algo.value_kwargs()))
        if step < algo.critic_warmup_steps:
            continue  # the critic learns first; the policy waits for values worth a baseline
        stats = run.trainer.train_step(
            part, algo.loss, kwargs, old_logprobs=pick(old, idx), ref_logprobs=ref and pick(ref, idx), temperature=T
        )
        if stats.get("skipped_nonfinite"):
            skipped_nonfinite(run, stats)
        policy_steps.append(stats)
    return metrics | mean_of(policy_steps, "train/") | mean_of(critic_steps, "critic/")


def pick(rows: list[Any], idx: list[int]) -> list[Any]:
    return [rows[i] for i in idx]


def mean_of(steps: list[dict[str, float]], prefix: str) -> dict[str, float]:
    """The batch's metrics over its optimiser steps: the mean, or for `<name>_max` the maximum."""
    keys = sorted({k for s in steps for k in s})
    return {
        prefix + k: max(s.get(k, float("-inf")) for s in steps)
        if k.endswith("_max")
        else sum(s.get(k, 0.0) for s in steps) / len(steps)
        for k in keys
    }


def updates(n: int, epochs: int, size: int | None, rng: random.Random | None = None) -> list[list[int]]:
    """The sample indices of each optimiser step: every epoch walks the batch in mini-batches of `size`, in a
    fresh order when `rng` is given (algorithm.shuffle), so no mini-batch repeats across epochs."""
    size = size or n
    out = []
    for _ in range(epochs):
        order = list(range(n))
        if rng is not None and size < n:
            rng.shuffle(order)
        out += [order[i : i + size] for i in range(0, n, size)]
    return out


def skipped_nonfinite(run: Parts, stats: dict[str, float]) -> None:
    """The trainer skipped an update whose loss or gradients were NaN/inf; past the bound the run stops."""
    run.nonfinite.append(f"loss {stats.get('loss')}, batch of {stats.get('tokens', 0):.0f} tokens")
    bound = run.cfg.loop.max_nonfinite_steps
    log.warning(
        "a NaN/inf loss or gradient: update skipped (%s; loop.max_nonfinite_steps=%d)", run.nonfinite[-1], bound
    )
    if len(run.nonfinite) > bound:
        raise FloatingPointError(
            f"{len(run.nonfinite)} updates skipped for a NaN/inf loss or gradient, more than "
            f"loop.max_nonfinite_steps={bound}; the first: {run.nonfinite[0]} (check the loss, learning rate, "
            "advantages and engine log-probs)"
        )
