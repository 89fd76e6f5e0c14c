"""The `engine:` section when `engine.name: vllm`: the shared fields plus vLLM's serving topology. Server flags
are still not modelled: `args` (and each role's `args`) go to `vllm serve` verbatim."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vime.engine import EngineConfig


class RoleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_servers: int = Field(default=1, ge=1)
    args: dict[str, Any] = Field(default_factory=dict, description="flags for this role only, verbatim")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="environment for this role only (e.g. CUDA_VISIBLE_DEVICES without Ray placement)",
    )


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="front a plain pool with the router too (always on for pd)")
    policy: str = Field(default="consistent_hash", description="router policy (pd: round_robin by default)")
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm-router flags, verbatim (`disable_retries: true` -> --disable-retries, "
        "`retry_max_retries: 3` -> --retry-max-retries 3)",
    )


class VLLMEngineConfig(EngineConfig):
    topology: Literal["aggregated", "pd"] = Field(
        default="aggregated",
        description="aggregated: each server prefills and decodes; pd: separate prefill and decode servers, KV "
        "moved by the connector",
    )
    prefill: RoleConfig = RoleConfig()
    decode: RoleConfig = RoleConfig()
    kv_connector: str = Field(default="nixl", description="P/D KV transport: nixl (CPU and GPU), mooncake (GPU)")
    router: RouterConfig = RouterConfig()

    @field_validator("topology", mode="before")
    @classmethod
    def _renamed(cls, v: Any) -> Any:
        if v == "colocated_pd":
            raise ValueError("'colocated_pd' is now called 'aggregated' (it never meant placement.colocate)")
        return v

    @property
    def num_servers(self) -> int:
        return self.prefill.num_servers + self.decode.num_servers if self.topology == "pd" else self.num_engines
