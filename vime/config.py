"""The root config: it only composes the component configs, each of which lives beside its component.

A recipe is YAML; `--set a.b=v` and `--vllm-<flag> v` override it. Every key is checked before anything starts,
and an error names the key, the file it came from and the keys allowed there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vime.algorithms.recipe import AlgorithmConfig
from vime.data.source import DataConfig
from vime.engine import EngineConfig
from vime.gateway.app import GatewayConfig
from vime.loop import LoopConfig
from vime.placement import PlacementConfig, RayConfig
from vime.rollout.default import RolloutConfig
from vime.trainer import TrainerConfig
from vime.weights import WeightsConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    path: str = Field(description="HF model directory (config.json + safetensors + tokenizer)")
    tokenizer: str | None = Field(default=None, description="tokenizer directory; defaults to path")


class RunConfig(Strict):
    out_dir: str = "runs/default"
    seed: int = 0
    wandb_project: str | None = Field(default=None, description="also log to Weights & Biases (needs wandb)")
    save_samples: bool = Field(default=False, description="write every step's samples to out_dir/samples/")


class Config(Strict):
    model: ModelConfig
    engine: EngineConfig = EngineConfig()
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    trainer: TrainerConfig = TrainerConfig()
    weights: WeightsConfig = WeightsConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    loop: LoopConfig = LoopConfig()
    ray: RayConfig = RayConfig()
    placement: PlacementConfig = PlacementConfig()
    gateway: GatewayConfig = GatewayConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _weights_fit_placement(self) -> "Config":
        if self.weights.backend == "ipc" and not self.placement.colocate:
            raise ValueError("weights.backend=ipc maps the trainer's GPU memory into the engine, so it needs "
                             "placement.colocate: true; use weights.backend=nccl for separate GPUs")
        if self.weights.backend == "nccl" and self.placement.colocate:
            raise ValueError("weights.backend=nccl cannot link two processes on one GPU; with placement.colocate: "
                             "true use weights.backend=ipc")
        return self


class ConfigError(ValueError):
    pass


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        nxt = d.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
        d = nxt
    d[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, _, raw = item.partition("=")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the section that holds the bad key, walking the model along `loc`."""
    cur: Any = model
    for part in loc[:-1]:
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return []
        cur = field.annotation
    return sorted(getattr(cur, "model_fields", {}))


def _explain(e: ValidationError, origin: dict[str, str], default_src: str) -> str:
    lines = []
    for err in e.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        src = origin.get(key, default_src)
        if not loc:  # a rule across sections (a model validator)
            lines.append(f"{err['msg'].removeprefix('Value error, ')} (in {src})")
        elif err["type"] == "extra_forbidden":
            allowed = _allowed_keys(Config, loc)
            lines.append(f"unknown key '{key}' in {src}; allowed here: {', '.join(allowed)}")
        elif err["type"] == "missing":
            lines.append(f"missing key '{key}' in {src}")
        else:
            lines.append(f"bad value for '{key}' in {src}: {err['msg']} (got {err.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                engine_args: dict[str, Any] | None = None) -> Config:
    raw: dict[str, Any] = {}
    src = str(path) if path else "<defaults>"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {src} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {src} must be a mapping of sections, got {type(raw).__name__}")
    origin: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        _set_path(raw, key, value)
        origin[key] = f"--set {item}"
    for flag, value in (engine_args or {}).items():
        raw.setdefault("engine", {}).setdefault("args", {})[flag] = value
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e, origin, src)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
