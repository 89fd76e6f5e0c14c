"""Bit sums at the memory's speed on a GPU, and taken inside the copy that loads a tensor.

A push's check reads every pushed byte on both sides (`fingerprint.bit_sum`: the bytes as int32 words, summed
modulo 2³²). PyTorch's int32 `sum` of one large tensor runs at the memory's speed, but a model is hundreds of
tensors, each a reduction and a stack (H100, graphed: 3.0 ms for a 0.5B model's 290 tensors, 0.9 GB), and the
engine's sums were a second read of everything its load had just written. Here one Triton kernel: persistent
programs that stream a tensor's words and add one partial sum each into the tensor's slot (int32 atomics wrap
modulo 2³², which is the sum's definition), one launch per tensor (1.4 ms for the same 290). With a destination
it copies the words as it sums them: a replayed load (`load_plan.py`) then sums what it writes into each
parameter at no extra read (H100, a 7B engine's parameters: copy + sums 11.0 ms, where the graphed copy alone was
12.7 and the sums another 6.4). It takes whole 4-byte aligned words only; anything else (odd 2-byte lengths, 1-
and 8-byte elements, CPU tensors, no Triton) is left to the callers' PyTorch path.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

BLOCK = 2048  # words per program and step: 16 words a thread at 4 warps (four 16-byte loads)
WAVES = 4  # programs per SM for a large tensor; each loops over its share
# Summing alone (no copy), PyTorch's int32 sum of one large tensor ran at the memory's speed, faster than this
# kernel (H100: 1.5 vs 2.0 ms for 4 GiB); its cost is the launches of many small ones. So sums alone take the
# kernel below this size only.
TORCH_FROM = 16 << 20


@functools.cache
def _kernel() -> Any:
    """The Triton kernel, compiled on first use (None: Triton is not importable here)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def words_sum(src, dst, out, slot, n, BLOCK: tl.constexpr, COPY: tl.constexpr):  # type: ignore[no-untyped-def]
        pid = tl.program_id(0)
        step = tl.num_programs(0) * BLOCK
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for at in range(pid * BLOCK, n, step):
            offs = tl.arange(0, BLOCK).to(tl.int64) + tl.multiple_of(at, BLOCK)  # whole blocks: loads vectorise
            inside = offs < n
            w = tl.load(src + offs, mask=inside, other=0)
            if COPY:
                tl.store(dst + offs, w, mask=inside)
            acc += w
        tl.atomic_add(out + slot, tl.sum(acc, axis=0))

    return words_sum


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def words(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor as flat int32 words, or None where it is not whole aligned words (or not contiguous)."""
    if not t.is_contiguous() or (t.numel() * t.element_size()) % 4 or t.data_ptr() % 4:
        return None
    return t.reshape(-1).view(torch.uint8).view(torch.int32)


def usable(device: torch.device) -> bool:
    """Whether the kernel runs here: a CUDA device (or Triton's interpreter, for the CPU tests), Triton, and the
    kernel copying and summing a few blocks exactly as PyTorch does (checked once per device: a kernel that fails
    to build or computes wrong leaves every caller on PyTorch's path, never a push that fails)."""
    on = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return on and _kernel() is not None and _works(str(device))


@functools.cache
def _works(device: str) -> bool:
    try:
        src = torch.arange(-3 * BLOCK, 3 * BLOCK + 5, dtype=torch.int32, device=device) * 7919
        dst, out = torch.zeros_like(src), torch.zeros(2, dtype=torch.int32, device=device)
        launch(src, out, 1, dst)
        launch(src[1:], out, 0)
        ok = torch.equal(dst, src) and out.tolist() == [
            int(src[1:].sum(dtype=torch.int32)),
            int(src.sum(dtype=torch.int32)),
        ]
    except Exception as e:  # noqa: BLE001 - whatever Triton raises, PyTorch's path remains
        logger.warning(
            "word-sum kernel unusable on %s (%s: %s): bit sums and copies stay on PyTorch", device, type(e).__name__, e
        )
        return False
    if not ok:
        logger.warning("word-sum kernel on %s disagrees with PyTorch: bit sums and copies stay on PyTorch", device)
    return ok


def launch(src: torch.Tensor, out: torch.Tensor, slot: int, dst: torch.Tensor | None = None) -> None:
    """Add the word sum of `src` (flat int32) into `out[slot]` (int32); with `dst` (flat int32, same length) also
    copy the words there. Asynchronous; capturable in a CUDA graph once compiled (call it once outside first)."""
    n = src.numel()
    if n == 0:
        return
    if dst is not None and dst.numel() != n:
        raise ValueError(f"words copy of {n} words into {dst.numel()}")
    grid = (max(1, min(-(-n // BLOCK), WAVES * _sms(src.device))),)
    _kernel()[grid](src, src if dst is None else dst, out, slot, n, BLOCK=BLOCK, COPY=dst is not None)
