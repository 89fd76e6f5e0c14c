"""vLLM as a vime engine: the one object `vime.registry.ENGINES["vllm"]` names. Importing it imports neither vLLM
nor torch (a recipe is checked with it before anything starts); the group and channel import vLLM when built."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engines.vllm.config import VLLMEngineConfig
from vime.engine import EngineConfig
from vime.protocols import EngineGroup, EngineSpec
from vime.weights import WeightsConfig

# weights.backend -> how it moves the bytes (vLLM's weight-transfer engines; gloo, disk and vime_ipc are ours)
WEIGHT_BACKENDS: Mapping[str, str] = {
    "gloo": "broadcast over a gloo group (CPU)",
    "nccl": "vLLM's NCCL broadcast (separate GPUs or hosts)",
    "ipc": "CUDA IPC staging buffer (trainer and engine on the same GPU)",
    "disk": "safetensors files in weights.disk_dir (any)",
}


def as_vllm(cfg: EngineConfig) -> VLLMEngineConfig:
    """The vLLM schema of an engine section built as the shared base (e.g. in a test or a benchmark)."""
    return cfg if isinstance(cfg, VLLMEngineConfig) else VLLMEngineConfig.model_validate(cfg.model_dump())


class VLLMSpec:
    name = "vllm"
    config: type[EngineConfig] = VLLMEngineConfig
    weight_channel = "engines.vllm.weight_channel:VLLMWeightChannel"
    weight_backends = WEIGHT_BACKENDS

    def validate(self, engine: EngineConfig, weights: WeightsConfig, colocate: bool) -> list[str]:
        if weights.backend == "ipc" and not colocate:
            return [
                (
                    "weights.backend=ipc maps the trainer's GPU memory into the engine, so it needs "
                    "placement.colocate: true; use weights.backend=nccl for separate GPUs"
                )
            ]
        if weights.backend == "nccl" and colocate:
            return [
                (
                    "weights.backend=nccl cannot link two processes on one GPU; with placement.colocate: "
                    "true use weights.backend=ipc"
                )
            ]
        return []

    def context_limit(self, engine: EngineConfig) -> int | None:
        limit = engine.args.get("max_model_len") or engine.args.get("max-model-len")
        return int(limit) if limit else None

    def make_group(
        self,
        cfg: EngineConfig,
        *,
        model_path: str,
        log_dir: str,
        weights_backend: str | None = None,
        placement: tuple[Any, list[int]] | None = None,
        sleep_mode: bool = False,
    ) -> EngineGroup:
        from engines.vllm.group import VLLMEngineGroup

        return VLLMEngineGroup(
            as_vllm(cfg),
            model_path=model_path,
            log_dir=log_dir,
            weights_backend=weights_backend,
            placement=placement,
            sleep_mode=sleep_mode,
        )

    def attach(self, urls: list[str]) -> EngineGroup:
        from engines.vllm.group import VLLMEngineGroup

        return VLLMEngineGroup.attach(urls)


SPEC: EngineSpec = VLLMSpec()  # annotated: the type checker proves the spec (and its group) fit
