"""PPO's critic on Megatron-core: the trainer's own ranks in the `critic` role (the policy's architecture with a
value head, `value_head.py`), so layout, optimiser, checkpoints and `trainer.args` work as for the policy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainers.megatron.trainer import MegatronTrainer
from vime.trainer import CriticConfig
from vime.types import Sample

VALUE_LOSS = "vime.algorithms.value:clipped_value_loss"


class MegatronCritic:
    def __init__(self, cfg: CriticConfig, *, model_path: str, placement: Any = None):
        self.ranks = MegatronTrainer(cfg, model_path=model_path, placement=placement, role="critic")

    def values(self, samples: list[Sample]) -> list[list[float]]:
        return self.ranks.logprobs(samples)  # the value head fills the slot the policy's log-probs come back in

    def train_step(
        self,
        samples: list[Sample],
        returns: list[list[float]],
        old_values: list[list[float]],
        loss_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, float]:
        chunks = self.ranks._chunks(samples, returns=returns, old_values=old_values)
        return self.ranks._fan("train_step", chunks, VALUE_LOSS, dict(loss_kwargs or {}))[0]

    def save(self, path: str) -> None:
        self.ranks.save(path)

    def load(self, path: str) -> None:
        self.ranks.load(path)

    def shutdown(self) -> None:
        self.ranks.shutdown()
