"""The root config: it only composes the component configs, each of which lives beside its component.

A recipe is YAML; `--set a.b=v` and `--<engine>-<flag> v` override it. Every key is checked before anything
starts, against the chosen engine's own schema too, and an error names the key, the file it came from and the
keys allowed there.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from vime.algorithms.recipe import AlgorithmConfig
from vime.data.source import DataConfig
from vime.engine import EngineConfig
from vime.gateway.config import GatewayConfig
from vime.placement import PlacementConfig, RayConfig
from vime.registry import DEFAULT_ENGINE, PluginError
from vime.rollout.config import RolloutConfig
from vime.specs import engine_spec, trainer_spec
from vime.supervise import ProbeConfig
from vime.trainer import CriticConfig, TrainerConfig
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


class LoopConfig(Strict):
    num_steps: int = Field(default=20, ge=0, description="RL steps")
    sft_steps: int = Field(default=0, ge=0, description="supervised warm-start steps before RL")
    sft_batch_size: int = Field(default=64, ge=1)
    sft_lr: float | None = Field(default=None, description="warm-start learning rate (default: trainer.lr)")
    sft_path: str | None = Field(
        default=None,
        description="JSONL of conversations {messages, tools} to warm-start on (agent traces); default: the prompt "
        "data's labels as one-turn answers",
    )
    eval_every: int = Field(default=5, ge=0, description="0 = only before and after")
    eval_size: int = Field(default=64, ge=1)
    save_every: int = Field(default=0, ge=0, description="0 = no checkpoints")
    keep: int = Field(default=2, ge=1, description="checkpoints kept")
    mode: Literal["sync", "async"] = Field(
        default="sync",
        description="async: rollouts of the next batches run while the trainer learns from this one (split placement)",
    )
    max_staleness: int = Field(
        default=0, ge=0, description="no trained token was sampled more than this many weight versions ago (sync: 0)"
    )
    stale_policy: Literal["drop", "regenerate"] = Field(
        default="regenerate",
        description="async: a group with a token beyond max_staleness is dropped, or its prompt sampled again",
    )
    rollout_timeout_s: float = Field(
        default=1800.0, gt=0, description="async: the longest the trainer waits for a batch of rollouts"
    )
    mixed_versions: Literal["keep", "mask_old"] = Field(
        default="keep",
        description="async: a generation that spans a push keeps its older tokens (importance-corrected by the "
        "loss) or masks them out of the loss",
    )
    max_engine_restarts: int = Field(
        default=8,
        ge=0,
        description="engine deaths a run survives (restarted, "
        "re-synced, requests re-issued) before it fails with the first cause",
    )
    engine_probe: ProbeConfig = Field(
        default_factory=ProbeConfig, description="health probes that tell a hung engine server from a busy one"
    )
    max_nonfinite_steps: int = Field(
        default=3,
        ge=0,
        description="steps whose loss or gradients were NaN/inf, skipped without an update, before the run stops",
    )


class Config(Strict):
    model: ModelConfig
    engine: EngineConfig = EngineConfig()
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    trainer: TrainerConfig = TrainerConfig()
    weights: WeightsConfig = WeightsConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    critic: CriticConfig | None = Field(default=None, description="PPO's value model (algorithm.estimator=gae)")
    loop: LoopConfig = LoopConfig()
    ray: RayConfig = RayConfig()
    placement: PlacementConfig = PlacementConfig()
    gateway: GatewayConfig = GatewayConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _parts_agree(self) -> Config:
        """Rules that span sections belong to the part that knows them: the engine's spec (its weight backends,
        what they need of placement) and the trainer's spec (the keys its backend takes in trainer.args)."""
        spec = engine_spec(self.engine.name)
        errors = []
        if self.weights.backend not in spec.weight_backends:
            offered = "; ".join(f"{k}: {v}" for k, v in spec.weight_backends.items())
            errors.append(
                f"weights.backend={self.weights.backend!r} is not offered by engine {spec.name!r}; "
                f"choose one of: {offered}"
            )
        else:
            errors += spec.validate(self.engine, self.weights, self.placement.colocate)
        errors += trainer_spec(self.trainer.name).check_args(self.trainer.args)
        errors += self._critic_errors() + self._async_errors()
        if errors:
            raise ValueError("\n  ".join(errors))
        return self

    def _async_errors(self) -> list[str]:
        """Async is off-policy by design: it needs room for stale tokens, engines that keep generating while the
        trainer works, and a loss that sees the sampling policy (never a silent ratio of 1)."""
        loop, algo = self.loop, self.algorithm
        if loop.mode == "sync":
            return []
        errors = []
        if loop.max_staleness < 1:
            errors.append("loop.mode=async needs loop.max_staleness >= 1 (rollouts overlap a push)")
        if self.placement.colocate:
            errors.append(
                "loop.mode=async needs split placement (placement.colocate: false): colocated, the engines and the "
                "trainer take turns on the same devices, so there is nothing to overlap"
            )
        if self.weights.pause_mode == "abort":
            errors.append("loop.mode=async: weights.pause_mode=abort would cut every in-flight rollout; use keep")
        if algo.old_logprobs == "recompute" and not (algo.tis or algo.mis):
            errors.append(
                "loop.mode=async: with algorithm.old_logprobs=recompute and no algorithm.tis/mis the ratio's "
                "denominator is the trainer's current policy, not the stale one that sampled: set "
                "algorithm.old_logprobs=rollout, or algorithm.tis / algorithm.mis"
            )
        return errors

    def _critic_errors(self) -> list[str]:
        """A critic exactly when the estimator uses values (a built-in other than gae never does; a plug-in may)."""
        est, critic = str(self.algorithm.estimator), self.critic
        if critic is None:
            return [] if est != "gae" else ["algorithm.estimator=gae (PPO) needs a critic: add a 'critic:' section"]
        errors = trainer_spec(critic.name).check_args(critic.args)
        if ":" not in est and est != "gae":
            errors.append(f"'critic:' is set but algorithm.estimator={est!r} uses no values: remove it or use gae")
        if critic.colocate and critic.world_size != self.trainer.world_size:
            errors.append(
                f"critic.colocate shares the trainer's bundles, so critic.world_size ({critic.world_size}) must "
                f"equal trainer.world_size ({self.trainer.world_size}); or set critic.colocate: false"
            )
        return errors


@functools.cache
def config_schema(engine: str) -> type[Config]:
    """The root config with the `engine` section typed by that engine's own schema."""
    cls = engine_spec(engine).config
    if cls is EngineConfig:
        return Config
    return create_model(
        f"Config_{engine.replace(':', '_').replace('.', '_')}",
        __base__=Config,
        engine=(cls, Field(default_factory=cls)),
    )


def gateway_config(cfg: Config) -> GatewayConfig:
    """The recipe's gateway section, with what only the whole recipe knows filled in (the context limit is in
    the engine's flags, which only the engine's spec can read)."""
    limit = engine_spec(cfg.engine.name).context_limit(cfg.engine)
    update: dict[str, Any] = {"model_name": cfg.gateway.model_name or cfg.model.path}
    if limit:
        update["context_length"] = int(limit)
    return cfg.gateway.model_copy(update=update)


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


def _explain(e: ValidationError, origin: dict[str, str], default_src: str, schema: type[BaseModel]) -> str:
    lines = []
    for err in e.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        src = origin.get(key, default_src)
        if not loc:  # a rule across sections (a model validator)
            lines.append(f"{err['msg'].removeprefix('Value error, ')} (in {src})")
        elif err["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema, loc)
            lines.append(f"unknown key '{key}' in {src}; allowed here: {', '.join(allowed)}")
        elif err["type"] == "missing":
            lines.append(f"missing key '{key}' in {src}")
        else:
            lines.append(f"bad value for '{key}' in {src}: {err['msg']} (got {err.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def read_recipe(p: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file as a mapping; `base: other.yaml` (relative to it) is read first and this one merged over it,
    key by key, so a variant recipe says only what it changes."""
    if not p.is_file():
        raise ConfigError(f"recipe file {str(p)!r} does not exist" + (f" (base: of {seen[-1]})" if seen else ""))
    if p.resolve() in seen:
        raise ConfigError(f"recipe {p} names itself through base: ({' -> '.join(map(str, seen))})")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {p} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {p} must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    return merged(read_recipe(p.parent / str(base), (*seen, p.resolve())), raw) if base else raw


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    engine_args: dict[str, Any] | None = None,
) -> Config:
    src = str(path) if path else "<defaults>"
    raw: dict[str, Any] = read_recipe(Path(path)) if path else {}
    origin: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        _set_path(raw, key, value)
        origin[key] = f"--set {item}"
    for flag, value in (engine_args or {}).items():
        raw.setdefault("engine", {}).setdefault("args", {})[flag] = value
    section = raw.get("engine")
    engine = str(section.get("name", DEFAULT_ENGINE)) if isinstance(section, dict) else DEFAULT_ENGINE
    try:
        schema = config_schema(engine)
    except PluginError as e:
        raise ConfigError(
            f"invalid config:\n  bad value for 'engine.name' in {origin.get('engine.name', src)}: {e}"
        ) from None
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e, origin, src, schema)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
