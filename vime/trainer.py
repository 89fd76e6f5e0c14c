"""Which trainer owns the weights, its parallel layout and optimiser. Backend-specific knobs are not modelled
here: `args` goes verbatim to the backend (for Megatron: fields of TransformerConfig / OptimizerConfig), and the
trainer's spec rejects a key the backend does not have when the recipe is loaded."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="megatron", description="registered trainer name or 'pkg.module:Class'")
    tp: int = Field(default=1, ge=1, description="tensor-parallel size")
    pp: int = Field(default=1, ge=1, description="pipeline-parallel size")
    ep: int = Field(default=1, ge=1, description="expert-parallel size (Mixture-of-Experts models)")
    world_size: int = Field(default=1, ge=1, description="ranks in all; dp = world_size / (tp * pp)")
    dtype: Literal["float32", "bfloat16"] = "float32"
    lr: float = Field(default=1e-4, gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_decay_steps: int | None = Field(default=None, description="cosine decay to min_lr over this many steps")
    weight_decay: float = Field(default=0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = Field(default=1.0, ge=0)
    micro_batch_size: int = Field(default=8, ge=1, description="sequences per micro-batch (memory bound)")
    distributed_optimizer: bool = False
    optimizer: bool = Field(
        default=True,
        description="false: forward and weight export only, no optimiser "
        "state (e.g. to benchmark pushes of models too big to train)",
    )
    recompute: bool = False
    offload_reference: bool = Field(
        default=True, description="GPU: the frozen KL reference waits in host memory between uses"
    )
    seed: int = 1234
    rendezvous_timeout_s: float = Field(
        default=300.0, gt=0, description="how long ranks wait for each other to join the process group"
    )
    cpus_per_rank: float = Field(default=1.0, gt=0)
    threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU: torch threads per rank (default: cpus_per_rank). A synchronous loop's engines idle while "
        "it trains, so on a small machine the trainer can use more cores than its Ray share",
    )
    gpus_per_rank: float = Field(default=0.0, ge=0, description="0 on CPU; 1 on GPUs")
    args: dict[str, Any] = Field(default_factory=dict, description="backend config fields, verbatim")

    @model_validator(mode="after")
    def _layout(self) -> TrainerConfig:
        if self.world_size % (self.tp * self.pp):
            raise ValueError(
                f"trainer.world_size ({self.world_size}) must be a multiple of tp*pp ({self.tp}*{self.pp})"
            )
        if self.world_size % (self.ep * self.pp):
            raise ValueError(
                f"trainer.world_size ({self.world_size}) must be a multiple of ep*pp ({self.ep}*{self.pp})"
            )
        return self

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)


class CriticConfig(TrainerConfig):
    """PPO's value model: a trainer of its own (layout, optimiser and `args` as the policy's), whose weights never
    go to the engines. Its network is the policy's architecture with a scalar value head in place of the LM head."""

    model_path: str | None = Field(default=None, description="HF directory it starts from (default: model.path)")
    colocate: bool = Field(
        default=True,
        description="share the trainer's bundles (same world_size; on GPUs each rank gets half the trainer's GPU "
        "share) instead of bundles of its own",
    )
