"""The Megatron trainer as one handle over its rank actors (`vime.protocols.Trainer`).

Each call fans out to every rank in the same order (Megatron's collectives need that); samples are split into
contiguous chunks per data-parallel rank, and results come back from the ranks that hold them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, Self

from vime.placement import bundle_strategy, ensure_ray, placement_group
from vime.trainer import TrainerConfig
from vime.types import Sample

log = logging.getLogger(__name__)


def to_rank_dict(s: Sample, per_token: dict[str, list[float]]) -> dict[str, Any]:
    """What a rank needs of a sample, plus per-token fields computed after the rollout (old and reference
    log-probs; the critic's returns and old values), by their micro-batch names (`batching.PER_TOKEN`)."""
    return {
        "prompt_ids": s.prompt_ids,
        "response_ids": s.response_ids,
        "loss_mask": s.loss_mask,
        "advantage": s.advantage,
        "token_advantages": s.token_advantages,
        "logprobs": s.logprobs,  # the engine's, for TIS / MIS
        "routed_experts": s.routed_experts,  # the engine's expert choices, for routing replay (R3)
        **per_token,
    }


def split(items: list[Any], parts: int) -> list[list[Any]]:
    k, r = divmod(len(items), parts)
    out, i = [], 0
    for p in range(parts):
        n = k + (1 if p < r else 0)
        out.append(items[i : i + n])
        i += n
    return out


class MegatronTrainer:
    def __init__(self, cfg: TrainerConfig, *, model_path: str, placement: Any = None, role: str = "policy"):
        import ray

        from trainers.megatron.worker import MegatronWorker

        ensure_ray()
        self.cfg = cfg
        self.model_path = model_path
        bundle = {"CPU": cfg.cpus_per_rank, "GPU": cfg.gpus_per_rank}
        if placement is None:
            self.pg, bundles = placement_group([bundle] * cfg.world_size), list(range(cfg.world_size))
        else:
            self.pg, bundles = placement
        self._own_pg = placement is None
        threads = str(cfg.threads or max(1, int(cfg.cpus_per_rank)))
        actor = ray.remote(MegatronWorker)
        self.workers = [
            actor.options(
                num_cpus=cfg.cpus_per_rank,
                num_gpus=cfg.gpus_per_rank,
                scheduling_strategy=bundle_strategy(self.pg, bundles[i]),
                runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}},
            ).remote(cfg.model_dump(), model_path, i, cfg.world_size, role)
            for i in range(cfg.world_size)
        ]
        addr, port = ray.get(self.workers[0].address.remote())
        self.ranks = ray.get([w.setup.remote(addr, port) for w in self.workers])

    def _fan(self, method: str, per_dp: list[Any] | None = None, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `method` on every rank; an exception raised inside a rank comes out as itself (Ray's wrapper is
        the chained cause), so callers catch `WeightPushError`, not Ray's task error."""
        import ray

        refs = []
        for w, r in zip(self.workers, self.ranks):
            a = (per_dp[r["dp_rank"]], *args) if per_dp is not None else args
            refs.append(getattr(w, method).remote(*a, **kwargs))
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, Exception):
                raise e.cause from e
            raise

    def _chunks(self, samples: list[Sample], **per_token: list[list[float]] | None) -> list[list[dict[str, Any]]]:
        if len(samples) < self.cfg.dp:
            raise ValueError(f"{len(samples)} samples cannot be split over {self.cfg.dp} data-parallel ranks")
        given = {k: v for k, v in per_token.items() if v is not None}
        rows = [to_rank_dict(s, {k: v[i] for k, v in given.items()}) for i, s in enumerate(samples)]
        return split(rows, self.cfg.dp)

    def logprobs(self, samples: list[Sample], temperature: float = 1.0, reference: bool = False) -> list[list[float]]:
        outs = self._fan("logprobs", self._chunks(samples), temperature, reference)
        by_dp: dict[int, list[list[float]]] = {}
        for r, o in zip(self.ranks, outs):
            if o is not None and r["tp_rank"] == 0:
                by_dp[r["dp_rank"]] = o
        return [lp for d in range(self.cfg.dp) for lp in by_dp[d]]

    def forward_logits(self, tokens: list[int]) -> Any:
        """Full-vocab logits [s, V] of one sequence, for parity checks against transformers."""
        outs = self._fan("forward_logits", None, tokens)
        return next(o for o, r in zip(outs, self.ranks) if o is not None and r["dp_rank"] == 0)

    def train_step(
        self,
        samples: list[Sample],
        loss: str = "policy",
        loss_kwargs: Mapping[str, Any] | None = None,
        old_logprobs: list[list[float]] | None = None,
        ref_logprobs: list[list[float]] | None = None,
        temperature: float = 1.0,
    ) -> dict[str, float]:
        outs = self._fan(
            "train_step",
            self._chunks(samples, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs),
            loss,
            dict(loss_kwargs or {}),
            temperature,
        )
        return outs[0]

    def weights(self, bucket_bytes: int = 256 << 20) -> Iterator[list[tuple[str, Any]]]:
        """HF-named full tensors, bucket by bucket, streamed from rank 0 (the other ranks feed the gathers)."""
        import ray

        gens = [w.stream_hf_buckets.options(num_returns="streaming").remote(bucket_bytes) for w in self.workers]
        for ref in gens[0]:
            yield ray.get(ref)
        for g in gens[1:]:
            for ref in g:
                ray.get(ref)

    def connect_weights(self, channel: str, cfg: dict[str, Any], urls: list[str], **kw: Any) -> None:
        """Open a weight channel (`pkg.module:Class`) inside rank 0, where the gathered tensors are."""
        self._fan("connect_weights", None, channel, cfg, urls, **kw)

    def push_weights(self, version: str) -> dict[str, float]:
        return self._fan("push_weights", None, version)[0]

    def set_lr(self, lr: float) -> None:
        self._fan("set_lr", None, lr)

    def reset_optimizer(self) -> None:
        self._fan("reset_optimizer", None)

    def save_hf(self, out_dir: str) -> str:
        return self._fan("save_hf", None, out_dir)[0]

    def save(self, path: str) -> None:
        self._fan("save", None, path)

    def load(self, path: str) -> None:
        self._fan("load", None, path)

    def call(self, method: str, *args: Any) -> list[Any]:
        """Run a worker method on every rank (e.g. the sender side of a weight channel)."""
        return self._fan(method, None, *args)

    def release_memory(self) -> None:
        """Give cached GPU memory back before a colocated engine wakes (no-op on CPU)."""
        self._fan("release_memory")

    def shutdown(self) -> None:
        import ray

        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=60)
        except Exception:  # a dead or hung rank: the actors are killed below either way, but say so
            log.exception("trainer ranks did not shut down cleanly; killing them")
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self._own_pg:
            ray.util.remove_placement_group(self.pg)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
