"""The gateway's section of a recipe. Kept apart from the app so that loading a config imports no web framework."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535, description="0: a free port")
    api_key: str | None = Field(default=None, description="Bearer key clients must send; None: $VIME_API_KEY")
    model_name: str | None = Field(default=None, description="the id clients use; default: the model path")
    tool_parser: str = Field(default="vime.gateway.tools:hermes", description="text -> (content, tool_calls)")
    context_length: int = Field(
        default=4096, description="prompt + max_tokens limit per request (default: the engine's)"
    )
    default_max_tokens: int = 256
    session_ttl_s: float = Field(default=3600.0, gt=0, description="a session idle this long is forgotten")
    max_sessions: int = Field(default=10_000, ge=1, description="past this, the least recently used go first")
    max_body_bytes: int = Field(default=8 << 20, ge=1024, description="larger request bodies get 413")
