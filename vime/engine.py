"""The engine section of a recipe: what every engine shares. Each engine extends it with its own schema (its
topology, KV connector, router, ...) in `engines/<name>/`; the recipe is checked against that extension, chosen
by `engine.name`. Engine flags are not modelled at all: `args` goes to the engine's server verbatim, so every flag
the engine has is available without vime knowing it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vime.registry import DEFAULT_ENGINE


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default=DEFAULT_ENGINE, description="registered engine name or 'pkg.module:SPEC'")
    num_engines: int = Field(default=1, ge=1, description="independent servers, each a full replica")
    host: str = Field(default="127.0.0.1", description="engines listen here; keep it loopback/private")
    args: dict[str, Any] = Field(default_factory=dict, description="server flags, passed through verbatim")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the server processes")
    cpus_per_engine: float = Field(default=1.0, gt=0, description="Ray resources of one engine's bundle")
    gpus_per_engine: float = Field(default=0.0, ge=0)
    startup_timeout_s: float = Field(default=300.0, gt=0)
    start_retries: int = Field(
        default=2, ge=0, description="times a server killed by a signal while starting is started again"
    )
    request_timeout_s: float = Field(default=600.0, gt=0)

    @property
    def num_servers(self) -> int:
        """Server processes the group runs (placement gives each a bundle); an engine with roles overrides it."""
        return self.num_engines
