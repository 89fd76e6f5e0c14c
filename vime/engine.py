"""Which inference engine serves rollouts, and how many. Engine flags are not modelled here: `args` is passed to
the engine's server verbatim, so every flag the engine has is available without vime knowing it."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vime.registry import ENGINES, resolve


class RoleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_servers: int = Field(default=1, ge=1)
    args: dict[str, Any] = Field(default_factory=dict, description="flags for this role only, verbatim")
    env: dict[str, str] = Field(default_factory=dict, description="environment for this role only (e.g. "
                                                                 "CUDA_VISIBLE_DEVICES without Ray placement)")


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="front a plain pool with the router too (always on for pd)")
    policy: str = Field(default="consistent_hash", description="router policy (pd: round_robin by default)")


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topology: Literal["colocated_pd", "pd"] = Field(
        default="colocated_pd", description="colocated_pd: each server prefills and decodes; pd: separate "
                                            "prefill and decode servers, KV moved by the connector")
    prefill: RoleConfig = RoleConfig()
    decode: RoleConfig = RoleConfig()
    kv_connector: str = Field(default="nixl", description="P/D KV transport: nixl (CPU and GPU), mooncake (GPU)")
    router: RouterConfig = RouterConfig()

    name: str = Field(default="vllm", description="registered engine name or 'pkg.module:Class'")
    num_engines: int = Field(default=1, ge=1)
    host: str = Field(default="127.0.0.1", description="engines listen here; keep it loopback/private")
    args: dict[str, Any] = Field(default_factory=dict, description="server flags, passed through verbatim")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the server processes")
    cpus_per_engine: float = Field(default=1.0, gt=0, description="Ray resources of one engine's bundle")
    gpus_per_engine: float = Field(default=0.0, ge=0)
    startup_timeout_s: float = Field(default=300.0, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0)

    @property
    def num_servers(self) -> int:
        return self.prefill.num_servers + self.decode.num_servers if self.topology == "pd" else self.num_engines


def make_engine_group(cfg: EngineConfig, model_path: str, log_dir: str, weights_backend: str | None = None,
                      placement: Any = None, sleep_mode: bool = False) -> Any:
    """Build (not start) the engine group named by `cfg.name`; `weights_backend` readies in-place updates,
    `placement` = (Ray placement group, bundle index per engine) runs each engine in a Ray actor, `sleep_mode`
    lets the engines free their GPU memory while a colocated trainer runs."""
    cls = resolve(ENGINES, cfg.name, kind="engine")
    kw = {"sleep_mode": True} if sleep_mode else {}  # engines without sleep support need not take the argument
    return cls(cfg, model_path=model_path, log_dir=log_dir, weights_backend=weights_backend, placement=placement,
               **kw)
