"""The trainer's resident weights read by the engines where they are (`weights.backend: ipc`, `weights.in_place`).

When the trainer declares its weights resident (`vime.weights.mark_resident`: they stay where they are and hold
what is pushed until the push returns), the engines map each one's memory once and read it in place — one copy of
the model per push instead of two (no staging), from the same addresses every push, so the engine's recorded load
replays. What is not resident — a tensor the trainer made for the push (q/k/v cut out of a fused parameter, a TP
all-gather) — is staged (`staging.py`). This side keeps which memory the engines have mapped, sends a handle only
for what is new and names what no push reads any more, for the engines to unmap (`ipc_engine.py`).
"""

from __future__ import annotations

import base64
import pickle
from typing import Any

import torch

from vime.weights import is_resident


def in_place(t: torch.Tensor) -> bool:
    """Whether the engines may read `t` where it is: a contiguous GPU tensor in one of the trainer's resident
    weights' memory."""
    return t.is_cuda and t.is_contiguous() and is_resident(t.untyped_storage().data_ptr())


def source_id(t: torch.Tensor) -> str:
    """The id of the memory `t` lies in (its storage: start address and size), as the engines map it."""
    st = t.untyped_storage()
    return f"{st.data_ptr():x}+{st.nbytes()}"


def source_handle(t: torch.Tensor) -> dict[str, Any]:
    """{GPU uuid: `reduce_tensor` args} of the whole storage `t` lies in, as flat bytes (like `Staging.handle`)."""
    from torch.multiprocessing.reductions import reduce_tensor

    flat = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
    return {str(torch.cuda.get_device_properties(t.device).uuid): reduce_tensor(flat)[1]}


def encoded(handle: dict[str, Any]) -> str:
    """A handle as it travels in JSON (a pickle: CUDA IPC handles carry torch types; `ipc_engine.open_handle`)."""
    return base64.b64encode(pickle.dumps(handle)).decode()


class Mapped:
    """The trainer memory the engines have mapped (ids), what this push read from, and what the next push tells
    them to unmap (read by no push since). One per channel connection: the engines forget theirs on reconnect."""

    def __init__(self) -> None:
        self.shared: set[str] = set()
        self.used: set[str] = set()
        self.drop: list[str] = []

    def placement(self, staged_offsets: list[int], direct: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        """`StagingUpdateInfo` fields for a round of staged tensors (at `staged_offsets` in the buffer) followed by
        resident ones: per tensor its offset and source, the handles of sources new to the engines, the sources to
        unmap."""
        if not direct:
            return {"offsets": list(staged_offsets)}
        ids = [source_id(t) for _, t in direct]
        new = {sid: t for (_, t), sid in zip(direct, ids) if sid not in self.shared}
        handles = {sid: encoded(source_handle(t)) for sid, t in new.items()}
        self.shared |= set(new)
        self.used |= set(ids)
        out = {
            "offsets": [*staged_offsets, *(t.storage_offset() * t.element_size() for _, t in direct)],
            "sources": [""] * len(staged_offsets) + ids,
            "new_sources": handles or None,
            "drop": self.drop or None,
        }
        self.drop = []
        return out

    def unread(self) -> None:
        """After a push: memory the engines mapped but this push did not read is unmapped on the next."""
        self.drop += sorted(self.shared - self.used)
        self.shared, self.used = self.used, set()
