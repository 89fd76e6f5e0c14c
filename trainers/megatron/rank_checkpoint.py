"""One rank's checkpoint shard: its model shard, optimiser and scheduler state, step count and every RNG, so a
resumed rank continues exactly where it stopped."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def save(w: Any, ckpt_dir: str) -> None:
    state = {
        "model": w.module().state_dict(),
        "optimizer": w.optimizer.state_dict(),
        "scheduler": w.scheduler.state_dict(),
        "steps": w.steps,
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": None if w.on_cpu else torch.cuda.get_rng_state(),
        },
    }
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save(state, os.path.join(ckpt_dir, f"rank_{w.rank:05d}.pt"))


def load(w: Any, ckpt_dir: str) -> None:
    path = os.path.join(ckpt_dir, f"rank_{w.rank:05d}.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: checkpoint has no shard for rank {w.rank} (was it saved with the same trainer.world_size/tp/pp?)"
        )
    state = torch.load(path, weights_only=False)
    w.module().load_state_dict(state["model"], strict=False)
    w.optimizer.load_state_dict(state["optimizer"])
    w.scheduler.load_state_dict(state["scheduler"])
    w.steps = state["steps"]
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
