"""The sender's CUDA-IPC staging buffer (`weights.backend: ipc`): where each tensor of a round goes, the copy in,
and the bit sums `verify` needs, read from the buffer itself.

Every tensor starts on a `CHUNK`-byte boundary and the bytes up to the next boundary stay zero, so the buffer up
to the round's end is whole chunks each owned by one tensor. The bit sums of all of them are then two kernels
however many tensors there are — one int32 sum per chunk, one `index_add_` into the tensors — where one
reduction per tensor cost ~17 µs of launch each (a 0.5B model is 290 tensors: 5 ms of a 50 ms push). Zero bytes
add nothing to a sum of words, so a tensor's chunks add up to `fingerprint.bit_sum` of the tensor, for 4-byte
elements and for 2-byte ones of even length (read as 4-byte words there too); the rest (8- and 1-byte elements,
odd 2-byte lengths) are summed one by one as before. The layout of a round is the same push after push (the same
names and shapes), so the gaps are zeroed only when it changes. What the sums read is what the engines read: the
staging buffer, after the copy.

The trainer's resident weights are not staged at all: the engines read them in place (`in_place.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from engines.vllm.fingerprint import bit_sum, bits_mod, tensor_sums

CHUNK = 16 << 10  # bytes; a multiple of every element size, and small next to a tensor of a 0.5B model
SLACK = 4096 * CHUNK  # room for the alignment of 4,096 tensors: a bucket of `nbytes` still fits in one round
LARGE = 16 << 20  # bytes from which a tensor is copied in on its own


def aligned(nbytes: int) -> int:
    return -(-nbytes // CHUNK) * CHUNK


def chunked(t: torch.Tensor) -> bool:
    """Whether a tensor's bit sum is the sum of its chunks read as int32 words (see the module's docstring)."""
    width = t.element_size()
    return width == 4 or (width == 2 and t.numel() % 2 == 0)


class Staging:
    """The buffer the engines map once, and the layout of the round now in it."""

    def __init__(self, nbytes: int, device: torch.device | str = "cuda") -> None:
        self.buffer = torch.zeros(aligned(nbytes) + SLACK, dtype=torch.uint8, device=device)
        self.layout: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...] = ()
        self.offsets: list[int] = []
        self.end = 0  # bytes of the buffer the round uses (whole chunks)
        self._views: list[tuple[str, torch.Tensor]] = []  # the round's tensors in the buffer (made once per layout)
        self.owner = torch.zeros(0, dtype=torch.int64)  # per chunk: its tensor's index (n: not summed by chunks)

    @property
    def capacity(self) -> int:
        return self.buffer.numel()

    def handle(self) -> dict[str, Any]:
        """{GPU uuid: `reduce_tensor` args} of the buffer: what an engine on this GPU maps it by (`ipc_engine.py`)."""
        from torch.multiprocessing.reductions import reduce_tensor

        dev = self.buffer.device
        return {str(torch.cuda.get_device_properties(dev).uuid): reduce_tensor(self.buffer)[1]}

    def rounds(self, tensors: list[tuple[str, torch.Tensor]]) -> list[list[tuple[str, torch.Tensor]]]:
        """The tensors cut into rounds that each fit the buffer (in order)."""
        out: list[list[tuple[str, torch.Tensor]]] = [[]]
        used = 0
        for name, t in tensors:
            need = aligned(t.numel() * t.element_size())
            if need > self.capacity:
                raise ValueError(
                    f"tensor {name} ({need >> 20} MiB) is larger than the ipc staging buffer "
                    f"({self.capacity >> 20} MiB): raise weights.bucket_mb"
                )
            if out[-1] and used + need > self.capacity:
                out.append([])
                used = 0
            out[-1].append((name, t))
            used += need
        return out

    def fill(self, part: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """Copy one round's tensors in; returns the views of the buffer they now are."""
        layout = tuple((n, t.dtype, tuple(t.shape)) for n, t in part)
        if layout != self.layout:
            self.buffer.zero_()  # the gaps between tensors must read as zeros (see the module's docstring)
            self.layout, self.offsets, off = layout, [], 0
            for _, t in part:
                self.offsets.append(off)
                off += aligned(t.numel() * t.element_size())
            self.end = off
            self._views = self._make_views()
            self.owner = self._owners()
        dst = self._views
        srcs = [t.detach().contiguous() for _, t in part]
        # small tensors as one multi-tensor copy (launches); large ones one copy each, which on an H100 moved a 7B
        # model's tensors in 10.7 ms where the multi-tensor copy took 12.7 (`bit_sums_kernel_h100.json`)
        large = [t.numel() * t.element_size() >= LARGE for t in srcs]
        torch._foreach_copy_(
            [v for (_, v), big in zip(dst, large) if not big], [t for t, big in zip(srcs, large) if not big]
        )
        for (_, v), t, big in zip(dst, srcs, large):
            if big:
                v.copy_(t)
        return dst

    def views(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._views)

    def _make_views(self) -> list[tuple[str, torch.Tensor]]:
        out = []
        for (name, dtype, shape), off in zip(self.layout, self.offsets):
            n = torch.Size(shape).numel() * dtype.itemsize
            out.append((name, self.buffer[off : off + n].view(dtype).view(shape)))
        return out

    def _owners(self) -> torch.Tensor:
        n = len(self.layout)
        owner = torch.full((self.end // CHUNK,), n, dtype=torch.int64)
        for i, ((_, v), off) in enumerate(zip(self._views, self.offsets)):
            if chunked(v):
                owner[off // CHUNK : (off + aligned(v.numel() * v.element_size())) // CHUNK] = i
        return owner.to(self.buffer.device)

    def bit_sums(self) -> list[int]:
        """Σbits (`fingerprint.bit_sum`, modulo `bits_mod`) of every tensor of the round in the buffer."""
        views = self._views
        words = self.buffer[: self.end].view(torch.int32).view(-1, CHUNK // 4)
        sums = torch.zeros(len(views) + 1, dtype=torch.int32, device=self.buffer.device)
        sums.index_add_(0, self.owner, words.sum(1, dtype=torch.int32))
        out = sums[:-1].tolist()
        for i, (_, v) in enumerate(views):
            if not chunked(v):
                out[i] = int(bit_sum(v))
        return [s % bits_mod(v.element_size()) for s, (_, v) in zip(out, views)]

    def sums(self, floats: list[bool]) -> list[list[Any]]:
        """`fingerprint.tensor_sums` of the round's tensors: the bit sums by chunks, Σw and Σw² only where
        `floats[i]` (the first push after connecting, or a parameter the engine checks by floats)."""
        with_floats = iter(tensor_sums([v for (_, v), f in zip(self._views, floats) if f]))
        return [[*next(with_floats)[:2], b] if f else [None, None, b] for b, f in zip(self.bit_sums(), floats)]
