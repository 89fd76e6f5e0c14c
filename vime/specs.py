"""From a recipe's names to running parts: the engine and trainer specs, looked up in the registry, and the two
factories the assembly calls. The only place in `vime/` that turns a name into an implementation."""

from __future__ import annotations

from typing import Any, cast

from vime.engine import EngineConfig
from vime.protocols import Critic, EngineGroup, EngineSpec, Trainer, TrainerSpec
from vime.registry import ENGINES, TRAINERS
from vime.trainer import CriticConfig, TrainerConfig


def engine_spec(name: str) -> EngineSpec:
    return cast(EngineSpec, ENGINES.get(name))


def trainer_spec(name: str) -> TrainerSpec:
    return cast(TrainerSpec, TRAINERS.get(name))


def make_engine_group(
    cfg: EngineConfig,
    model_path: str,
    log_dir: str,
    weights_backend: str | None = None,
    placement: tuple[Any, list[int]] | None = None,
    sleep_mode: bool = False,
) -> EngineGroup:
    """Build (not start) the engine group named by `cfg.name`."""
    return engine_spec(cfg.name).make_group(
        cfg,
        model_path=model_path,
        log_dir=log_dir,
        weights_backend=weights_backend,
        placement=placement,
        sleep_mode=sleep_mode,
    )


def make_trainer(cfg: TrainerConfig, model_path: str, placement: tuple[Any, list[int]] | None = None) -> Trainer:
    """Build and start the trainer named by `cfg.name` (its ranks are Ray actors)."""
    return trainer_spec(cfg.name).make(cfg, model_path=model_path, placement=placement)


def make_critic(cfg: CriticConfig, model_path: str, placement: tuple[Any, list[int]] | None = None) -> Critic:
    """Build and start PPO's value model on the backend `cfg.name` names."""
    return trainer_spec(cfg.name).make_critic(cfg, model_path=cfg.model_path or model_path, placement=placement)
