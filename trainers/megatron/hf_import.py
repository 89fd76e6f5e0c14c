"""An HF checkpoint into one rank's Megatron model: its TP shard, PP stage and expert-parallel experts
(the reverse of `export.py` + `hf_export.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainers.megatron import adapter, value_head


def load_into(w: Any, model: torch.nn.Module) -> None:
    """Load `w.model_path`'s safetensors into `model` (worker `w`'s rank); a missing or unexpected tensor fails
    naming it. A critic's value head is new, so the checkpoint is not asked for it."""
    from safetensors.torch import load_file

    files = sorted(Path(w.model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {w.model_path} (model.path)")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        hf.update(load_file(str(f)))
    full = adapter.from_hf(hf, w.hf_cfg)
    names = [n for n in model.state_dict() if not n.endswith("_extra_state")]
    if w.role == "critic":
        names = [n for n in names if not n.startswith(value_head.PARAM_PREFIX)]
    local = adapter.local_state_dict(
        full,
        names,
        tp_rank=w.tp_rank,
        tp=w.cfg.tp,
        pp_rank=w.pp_rank,
        layers_per_stage=w.layers_per_stage,
        ep_rank=w.ep_rank,
        experts_per_rank=(w.tcfg.num_moe_experts or 0) // w.cfg.ep,
    )
    missing, unexpected = model.load_state_dict(local, strict=False)
    missing = [m for m in missing if m in names]
    if missing or unexpected:
        raise RuntimeError(f"HF → Megatron load mismatch: missing {missing}, unexpected {unexpected}")
