"""Checks that need more than the recipe's schema but less than a running engine: the model directory, every
plug-in the recipe names, the data files and whether they last the run. They run before Ray, engines or trainer
start, so a typo costs a second, not the minute an engine takes to come up; each error names the key to fix."""

from __future__ import annotations

import json
from pathlib import Path

from vime.algorithms.estimators import ESTIMATORS
from vime.algorithms.losses import LOSSES
from vime.config import Config
from vime.data.buffer import FILTERS
from vime.data.source import PromptSource
from vime.gateway.tools import TOOL_PARSERS
from vime.registry import PluginError
from vime.rewards import REWARDS
from vime.rollout import ROLLOUTS
from vime.rollout.agent import AGENTS


class PreflightError(ValueError):
    """The recipe names something that is not there; the message says which key."""


def check_model(cfg: Config) -> None:
    model = Path(cfg.model.path)
    if not (model / "config.json").is_file():
        raise PreflightError(
            f"model.path={cfg.model.path!r} is not a Hugging Face model directory (no config.json "
            "there); point it at a local directory (no model hub is contacted)"
        )
    tok = Path(cfg.model.tokenizer or cfg.model.path)
    if not any((tok / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
        raise PreflightError(f"{key}={str(tok)!r} holds no tokenizer (tokenizer.json / tokenizer_config.json)")
    if cfg.algorithm.routing_replay:
        hf = json.loads((model / "config.json").read_text())
        if not any(hf.get(k) for k in ("num_experts", "n_routed_experts", "num_local_experts")):
            raise PreflightError(
                f"algorithm.routing_replay replays expert choices, but model.path={cfg.model.path!r} has no experts "
                f"(model_type {hf.get('model_type')!r}); turn it off or train a Mixture-of-Experts model"
            )


def check_plugins(cfg: Config) -> None:
    """Load every plug-in now (a wrong name or signature fails here, not after engines started)."""
    r = cfg.rollout
    try:
        REWARDS.get(r.reward)
        ROLLOUTS.get(r.function)
        for name in r.group_filters:
            FILTERS.get(name)
        LOSSES.get(cfg.algorithm.loss)
        ESTIMATORS.get(str(cfg.algorithm.estimator))
        if r.agent:
            AGENTS.get(r.agent)
            TOOL_PARSERS.get(cfg.gateway.tool_parser)
    except PluginError as e:
        raise PreflightError(str(e)) from None


def check_data(cfg: Config, source: PromptSource) -> None:
    if cfg.data.eval_path and not Path(cfg.data.eval_path).is_file():
        raise PreflightError(f"data.eval_path={cfg.data.eval_path!r} does not exist")
    if cfg.loop.sft_path and not Path(cfg.loop.sft_path).is_file():
        raise PreflightError(f"loop.sft_path={cfg.loop.sft_path!r} does not exist")
    need, have = cfg.loop.num_steps * cfg.rollout.batch_size, source.capacity()
    if have is not None and have < need:
        raise PreflightError(
            f"data.epochs={cfg.data.epochs} over {len(source.records)} records of {cfg.data.path} gives {have} "
            f"prompts, but loop.num_steps={cfg.loop.num_steps} x rollout.batch_size={cfg.rollout.batch_size} "
            f"needs {need}; raise data.epochs (or null: endless) or lower loop.num_steps"
        )


def preflight(cfg: Config, source: PromptSource) -> None:
    check_model(cfg)
    check_plugins(cfg)
    check_data(cfg, source)
