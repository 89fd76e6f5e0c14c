"""How trainer weights reach the engines. The channel itself lives with the engine (`engines/<name>/`), because
it speaks the engine's weight-transfer API, and so does the list of backends it offers (the engine's spec checks
`backend` against it); this is only the shared config and the error a failed push raises."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class WeightsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: str = Field(default="gloo", description="a weight backend the engine offers (its spec lists them)")
    pause_mode: Literal["keep", "abort", "wait"] = Field(
        default="keep",
        description="keep: in-flight requests freeze and continue on new weights (partial "
        "rollouts); abort: return them partial; wait: drain first",
    )
    bucket_mb: int = Field(default=256, ge=1, description="upper bound of one transfer bucket")
    timeout_s: float = Field(default=300.0, gt=0, description="no single step of a push may take longer")
    disk_dir: str = Field(default="/dev/shm", description="where the disk backend writes its buckets")
    delta: bool = Field(
        default=False,
        description="send only the elements whose bits changed since the version every engine holds (index/value "
        "pairs per tensor, whole tensors where that is not smaller), rebuilt bit-exactly on the engine; a full push "
        "whenever an engine does not hold that version. Both sides keep a host copy of the weights. vLLM: gloo",
    )
    in_place: bool = Field(
        default=True,
        description="colocated pushes (vLLM: ipc) read the weights the trainer declares resident where they are, "
        "one copy instead of two (`mark_resident`); false: stage every tensor (the path before, for comparisons)",
    )
    verify: bool = Field(
        default=True,
        description="after every push the engines' parameters are checked against what was sent (vLLM: sums per "
        "tensor); a mismatch fails the push naming the tensors",
    )
    verify_read_back: bool = Field(
        default=False,
        description="the engines read every pushed parameter again for the check; false: a colocated push that "
        "replays a recorded load (vLLM: ipc) sums what its copy writes as it writes it, and reads back only "
        "parameters it did not write whole",
    )


class WeightPushError(RuntimeError):
    """A push did not complete: engines may hold partly updated weights and must be restarted and re-synced."""


# ---- resident weights -----------------------------------------------------------------------------------------
# The trainer's promise for the push it is about to start, kept in its own process (where the channel runs): a
# tensor whose memory starts at one of these addresses is one of its live weights — it stays where it is from push
# to push and holds the values being pushed until the push returns. A colocated channel may then let the engines
# read it in place (one copy instead of two, the same addresses every push) instead of staging a copy of it.
_RESIDENT: set[int] = set()


def mark_resident(storage_ptrs: Iterable[int]) -> None:
    """Declare the storages (by start address) of the weights for the next push; replaces the last declaration."""
    _RESIDENT.clear()
    _RESIDENT.update(storage_ptrs)


def is_resident(storage_ptr: int) -> bool:
    return storage_ptr in _RESIDENT
