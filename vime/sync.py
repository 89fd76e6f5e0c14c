"""Weight sync between the trainer and the engines: the one place that knows the engines may sleep, that a push
names a version, and what to do when a push fails (restart the engines, reconnect, push again). Fault tolerance
grows here."""

from __future__ import annotations

import os
import subprocess
import threading

from vime.protocols import EngineGroup, Trainer
from vime.weights import WeightPushError, WeightsConfig


def gpu_free_gb() -> float:
    """Free memory of the first visible GPU as the driver sees it (all processes), in GB."""
    gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", gpu],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    return float(out.split()[0]) / 1024 if out.strip() else float("nan")


class WeightSync:
    """`sleeps`: colocated on GPUs, the engines give their memory to the trainer between rollout and push."""

    def __init__(self, trainer: Trainer, engines: EngineGroup, channel: str, weights: WeightsConfig, sleeps: bool):
        self.trainer, self.engines, self.channel, self.weights = trainer, engines, channel, weights
        self.sleeps = sleeps
        self.asleep = False
        self.version = "default"  # what the engines hold: the model directory's weights until the first push
        self.push_restarts = 0  # servers restarted because a push failed, since the last take_counts()
        # async: the trainer's thread pushes while the rollout thread may re-sync a restarted server
        self.lock = threading.RLock()

    def connect(self) -> None:
        self.trainer.connect_weights(self.channel, self.weights.model_dump(), self.engines.urls())

    def take_counts(self) -> dict[str, float]:
        out, self.push_restarts = {"faults/push_restarts": float(self.push_restarts)}, 0
        return out

    def resync(self) -> None:
        """After servers were restarted mid-rollout: every server (old and new) joins a new channel and gets the
        version the others hold; the model directory's weights need no push."""
        with self.lock:
            self.connect()
            if self.version != "default":
                self._push_or_restart(self.version)

    def release_engines(self) -> dict[str, float]:
        """Colocated on GPUs: the engines give their memory to the trainer until the next push."""
        if not self.sleeps or self.asleep:
            return {}
        before = gpu_free_gb()
        self.engines.sleep(level=1)
        self.asleep = True
        return {"memory/engine_sleep_freed_gb": gpu_free_gb() - before}

    def push(self, version: str) -> dict[str, float]:
        """Push the trainer's weights to every engine (waking sleeping ones: weights first, KV cache after the
        push); a failed push restarts the engines and retries once."""
        mem: dict[str, float] = {}
        before = 0.0
        if self.asleep:
            self.trainer.release_memory()  # the trainer's cached activations go back before the engine wakes
            before = gpu_free_gb()
            self.engines.wake_up(["weights"])
        try:
            with self.lock:
                stats = self._push_or_restart(version)
        finally:
            if self.asleep:
                self.engines.wake_up(["kv_cache"])
                self.asleep = False
                mem = {"memory/engine_wake_used_gb": before - gpu_free_gb()}
        return stats | mem

    def _push_or_restart(self, version: str) -> dict[str, float]:
        try:
            stats = self.trainer.push_weights(version)
        except WeightPushError:
            for i in range(len(self.engines.urls())):
                self.engines.restart(i)
                self.push_restarts += 1
            self.connect()
            stats = self.trainer.push_weights(version)
        self.version = version
        self.engines.note_weight_version(version)
        return stats
