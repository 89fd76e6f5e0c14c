"""How far behind the trainer a sampled token is, and the bound on it.

The loop names each push `step<N>` (the weights after N RL updates; the model directory's are "default", older
than any push). A token sampled under `step<v>` and learned from by a trainer at `step<t>` is `t - v` versions
stale. Only tokens the policy sampled count (loss mask 1): tool and user text carries no policy. The bound is per
token, so a partial rollout that spans a push is judged by its oldest sampled token.
"""

from __future__ import annotations

from collections import Counter

from vime.types import Group, Sample


def version_number(version: str) -> int:
    if version == "default":
        return -1
    if version.startswith("step") and version[4:].isdigit():
        return int(version[4:])
    raise ValueError(
        f"weight version {version!r} is not one the loop pushed ('step<N>' or 'default'): every sampled token "
        "must carry the version of the weights that sampled it (the engine's, or its adapter's bookkeeping)"
    )


def sampled_versions(sample: Sample) -> list[int]:
    if not sample.weight_versions:
        raise ValueError(
            f"sample {sample.group_id}/{sample.index} carries no per-token weight versions: its staleness cannot "
            "be bounded (the engine adapter must tag every token with the version that sampled it)"
        )
    return [version_number(v) for v, m in zip(sample.weight_versions, sample.loss_mask) if m]


def staleness(sample: Sample, trainer_version: int) -> int:
    """Versions between the trainer and the oldest token of `sample` it would learn from (0: none sampled)."""
    versions = sampled_versions(sample)
    return trainer_version - min(versions) if versions else 0


def mask_older_versions(sample: Sample) -> int:
    """A generation that spans a push, trained only on what the newest weights sampled: tokens of older versions
    keep conditioning the rest but leave the loss. Returns the number of tokens masked."""
    versions = sampled_versions(sample)
    if not versions or min(versions) == max(versions):
        return 0
    newest, masked = max(versions), 0
    for i, (v, m) in enumerate(zip(sample.weight_versions, sample.loss_mask)):
        if m and version_number(v) < newest:
            sample.loss_mask[i] = 0
            masked += 1
    return masked


def split_stale(groups: list[Group], trainer_version: int, bound: int) -> tuple[list[Group], list[Group]]:
    """(groups every token of which is within `bound`, groups with a token beyond it). A group goes as a whole:
    its advantages are relative to its members."""
    fresh: list[Group] = []
    stale: list[Group] = []
    for g in groups:
        (stale if any(staleness(s, trainer_version) > bound for s in g) else fresh).append(g)
    return fresh, stale


def check_bound(samples: list[Sample], trainer_version: int, bound: int) -> None:
    """The guarantee at the trainer's door: no token beyond the bound is learned from, whatever the loop did."""
    worst = max((staleness(s, trainer_version) for s in samples), default=0)
    if worst > bound:
        versions = sorted({v for s in samples for v, m in zip(s.weight_versions, s.loss_mask) if m})
        raise RuntimeError(
            f"batch holds tokens sampled {worst} weight versions behind the trainer (step{trainer_version}; "
            f"versions {versions}), more than loop.max_staleness={bound}"
        )


def staleness_metrics(samples: list[Sample], trainer_version: int) -> dict[str, float]:
    """The share of trained samples at each staleness, its mean and maximum, and how many spanned a push."""
    if not samples:
        return {}
    lags = [staleness(s, trainer_version) for s in samples]
    counts = Counter(lags)
    out = {f"staleness/frac_{k}": counts[k] / len(lags) for k in sorted(counts)}
    spans = sum(1 for s in samples if len(set(sampled_versions(s))) > 1)
    return out | {
        "staleness/mean": sum(lags) / len(lags),
        "staleness/max": float(max(lags)),
        "staleness/spanning_push_frac": spans / len(samples),
    }
