"""Which inference engine serves rollouts, and how many. Engine flags are not modelled here: `args` is passed to
the engine's server verbatim, so every flag the engine has is available without vime knowing it."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vime.registry import ENGINES, resolve


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="vllm", description="registered engine name or 'pkg.module:Class'")
    num_engines: int = Field(default=1, ge=1)
    host: str = Field(default="127.0.0.1", description="engines listen here; keep it loopback/private")
    args: dict[str, Any] = Field(default_factory=dict, description="server flags, passed through verbatim")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the server processes")
    cpus_per_engine: float = Field(default=1.0, gt=0, description="Ray resources of one engine's bundle")
    gpus_per_engine: float = Field(default=0.0, ge=0)
    startup_timeout_s: float = Field(default=300.0, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0)


def make_engine_group(cfg: EngineConfig, model_path: str, log_dir: str, weights_backend: str | None = None,
                      placement: Any = None) -> Any:
    """Build (not start) the engine group named by `cfg.name`; `weights_backend` readies in-place updates,
    `placement` = (Ray placement group, bundle index per engine) runs each engine in a Ray actor."""
    cls = resolve(ENGINES, cfg.name, kind="engine")
    return cls(cfg, model_path=model_path, log_dir=log_dir, weights_backend=weights_backend, placement=placement)
