"""Megatron-core as a vime trainer: the one object `vime.registry.TRAINERS["megatron"]` names.

`trainer.args` goes verbatim onto Megatron's own `TransformerConfig` and `OptimizerConfig`, so the keys it may hold
are exactly those dataclasses' fields; a key on neither is rejected when the recipe is loaded (before, it was
silently dropped and a run trained with a setting the user never got).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vime.protocols import Critic, Trainer, TrainerSpec
from vime.trainer import CriticConfig, TrainerConfig


def backend_fields() -> dict[str, set[str]]:
    """Field names of the Megatron dataclasses `trainer.args` is applied to (imports Megatron: only called when
    `trainer.args` is not empty)."""
    from megatron.core.optimizer.optimizer_config import OptimizerConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    return {cls.__name__: {f.name for f in dataclasses.fields(cls)} for cls in (TransformerConfig, OptimizerConfig)}


class MegatronSpec:
    name = "megatron"

    def check_args(self, args: Mapping[str, Any]) -> list[str]:
        if not args:
            return []
        fields = backend_fields()
        known = set().union(*fields.values())
        where = " or ".join(fields)
        return [
            f"unknown key 'trainer.args.{k}': not a field of Megatron's {where}; e.g. "
            f"{', '.join(sorted(known)[:8])}, ... (see megatron.core's dataclasses)"
            for k in args
            if k not in known
        ]

    def make(self, cfg: TrainerConfig, *, model_path: str, placement: tuple[Any, list[int]] | None) -> Trainer:
        from trainers.megatron.trainer import MegatronTrainer

        return MegatronTrainer(cfg, model_path=model_path, placement=placement)

    def make_critic(self, cfg: CriticConfig, *, model_path: str, placement: tuple[Any, list[int]] | None) -> Critic:
        from trainers.megatron.critic import MegatronCritic

        return MegatronCritic(cfg, model_path=model_path, placement=placement)


SPEC: TrainerSpec = MegatronSpec()  # annotated: the type checker proves the spec (and its trainer) fit
