"""SGLang as a vime engine: the one object `vime.registry.ENGINES["sglang"]` names. Importing it imports neither
SGLang nor torch (a recipe is checked with it before anything starts)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engines.sglang.config import SGLangEngineConfig
from vime.engine import EngineConfig
from vime.protocols import EngineGroup, EngineSpec
from vime.weights import WeightsConfig

# weights.backend -> SGLang's route that moves the bytes
WEIGHT_BACKENDS: Mapping[str, str] = {
    "nccl": "/update_weights_from_distributed over an NCCL group (separate GPUs or hosts)",
    "gloo": "/update_weights_from_distributed over a gloo group (CPU)",
    "ipc": "/update_weights_from_tensor with CUDA IPC handles (trainer and engine on the same GPU)",
    "disk": "safetensors files in weights.disk_dir, then /update_weights_from_disk (any)",
}


def as_sglang(cfg: EngineConfig) -> SGLangEngineConfig:
    return cfg if isinstance(cfg, SGLangEngineConfig) else SGLangEngineConfig.model_validate(cfg.model_dump())


class SGLangSpec:
    name = "sglang"
    config: type[EngineConfig] = SGLangEngineConfig
    weight_channel = "engines.sglang.weight_channel:SGLangWeightChannel"
    weight_backends = WEIGHT_BACKENDS

    def validate(self, engine: EngineConfig, weights: WeightsConfig, colocate: bool) -> list[str]:
        errors = []
        if weights.backend == "ipc" and not colocate:
            errors.append(
                "weights.backend=ipc hands the trainer's GPU memory to the engine, so it needs placement.colocate: "
                "true; use weights.backend=nccl for separate GPUs"
            )
        if weights.backend == "nccl" and colocate:
            errors.append(
                "weights.backend=nccl cannot link two processes on one GPU; with placement.colocate: true use "
                "weights.backend=ipc"
            )
        tp = int(engine.args.get("tp_size") or engine.args.get("tp") or 1)
        if tp > 1:
            errors.append(
                f"engine.args.tp_size={tp}: vime's SGLang weight channel sends to one rank per server so far; run "
                "tensor-parallel SGLang servers once it does (use engine.num_engines for more replicas)"
            )
        if weights.pause_mode == "wait":
            errors.append(
                "weights.pause_mode=wait: SGLang pauses in place (keep) or aborts (abort); it has no drain-first mode"
            )
        return errors

    def context_limit(self, engine: EngineConfig) -> int | None:
        limit = engine.args.get("context_length") or engine.args.get("context-length")
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
        from engines.sglang.group import SGLangEngineGroup

        return SGLangEngineGroup(
            as_sglang(cfg),
            model_path=model_path,
            log_dir=log_dir,
            weights_backend=weights_backend,
            placement=placement,
            sleep_mode=sleep_mode,
        )

    def attach(self, urls: list[str]) -> EngineGroup:
        from engines.sglang.group import SGLangEngineGroup

        return SGLangEngineGroup.attach(urls)


SPEC: EngineSpec = SGLangSpec()  # annotated: the type checker proves the spec (and its group) fit
