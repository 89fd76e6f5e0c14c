"""The numbers one RL step reports, shared by the sync and the async loop: phase timings, rollout
throughput, engine-vs-trainer log-prob agreement, and engine counters as per-step deltas."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from vime.protocols import EngineGroup
from vime.types import Group, Sample


class Timer(dict[str, float]):
    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self[f"time/{name}"] = time.perf_counter() - t


def consistency(samples: list[Sample], trainer_logprobs: list[list[float]]) -> dict[str, float]:
    """Engine vs trainer log-probs of the sampled tokens (loss-mask 1; tool/user tokens were not sampled). In the
    sync loop both hold the same weights, so this is the numerics' mismatch; in the async loop it is also how far
    the trainer has moved from the weights that sampled: `ratio_*` is the per-token pi_trainer / pi_engine."""
    diffs = [e - t for s, lp in zip(samples, trainer_logprobs) for e, t, m in zip(s.logprobs, lp, s.loss_mask) if m]
    if not diffs:
        return {}
    ratios = [math.exp(-d) for d in diffs]
    return {
        "consistency/mean_abs_diff": sum(abs(d) for d in diffs) / len(diffs),
        "consistency/max_abs_diff": max(abs(d) for d in diffs),
        "consistency/kl": sum(diffs) / len(diffs),  # E_engine[log p_engine - log p_trainer]
        "consistency/ratio_mean": sum(ratios) / len(ratios),
        "consistency/ratio_min": min(ratios),
        "consistency/ratio_max": max(ratios),
    }


def rollout_metrics(groups: list[Group], seconds: float) -> dict[str, float]:
    samples = [s for g in groups for s in g]
    tokens = sum(len(s.response_ids) for s in samples)
    return {
        "rollout/reward": sum(s.reward or 0.0 for s in samples) / max(1, len(samples)),
        "rollout/response_len": tokens / max(1, len(samples)),
        "rollout/tokens_per_s": tokens / seconds,
    }


class EngineCounters:
    """Per-step engine counters (P/D KV tokens transferred vs computed, TTFT), as deltas since the last call."""

    def __init__(self, engines: EngineGroup):
        self.engines = engines
        self.last: dict[str, float] = {}

    def __call__(self) -> dict[str, float]:
        now = self.engines.step_metrics()
        last, self.last = self.last, now
        out = {k: v for k, v in now.items() if k.startswith("engines/")}
        for k in now:
            if k.startswith(("kv/", "ttft/")):
                out[f"engines/{k}"] = now[k] - last.get(k, 0.0)
        n = out.pop("engines/ttft/count", 0.0)
        total = out.pop("engines/ttft/sum", 0.0)
        if n:
            out["engines/ttft_mean_s"] = total / n
        return out
