"""Named patches that let megatron-core 0.16.1 run on CPU processes with gloo. Imported only on CPU.

Each patch answers one hard-coded CUDA assumption in megatron-core; `apply()` installs all of them and
`PINNED` is the version they were written against (a different version fails loudly instead of misbehaving).
"""

from __future__ import annotations

import contextlib
import functools
from importlib import metadata
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

PINNED = "0.16.1"
_MODE: list[CudaToCpuMode] = []  # the one installed mode (entered once per process)


def check_version() -> None:
    v = metadata.version("megatron-core")
    if v != PINNED:
        raise RuntimeError(
            f"trainers/megatron/cpu_shim.py is pinned to megatron-core {PINNED}, found {v}: "
            "re-check each patch against that version before changing the pin"
        )


def patch_current_device() -> None:
    """RotaryEmbedding and many others call torch.cuda.current_device() for tensor placement."""
    torch.cuda.current_device = lambda: torch.device("cpu")


def patch_synchronize() -> None:
    """PP p2p and dist_checkpointing call torch.cuda.synchronize()."""
    torch.cuda.synchronize = lambda *a, **k: None


def patch_rng_tracker(seed: int) -> None:
    """The model-parallel RNG tracker forks CUDA generators: make it drive the CPU generator, so dropout and
    activation recompute keep their semantics."""
    from megatron.core.tensor_parallel import random as r

    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda s, *a, **k: torch.set_rng_state(s)
    r._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    r._set_cuda_rng_state = lambda s, *a, **k: torch.set_rng_state(s)
    r.initialize_rng_tracker(force_reset=True)
    r.model_parallel_cuda_manual_seed(seed)


def patch_default_causal_mask() -> None:
    """`get_default_causal_mask` builds its mask with device='cuda'."""
    import megatron.core.fusions.fused_softmax as fs

    fs.get_default_causal_mask = functools.lru_cache(32)(lambda sq: torch.triu(torch.ones(sq, sq, dtype=torch.bool), 1))


class _Event:
    def synchronize(self) -> None: ...

    def wait(self, *_: Any) -> None: ...

    def query(self) -> bool:
        return True


class _Stream:
    """CPU work is ordered already; the all-to-all dispatcher only asks a side stream to copy split sizes."""

    def __init__(self, *_: Any, **__: Any) -> None: ...

    def wait_stream(self, _: Any) -> None: ...

    def wait_event(self, _: Any) -> None: ...

    def record_event(self, _: Any = None) -> _Event:
        return _Event()

    def synchronize(self) -> None: ...


def patch_cuda_streams() -> None:
    """MoE all-to-all dispatcher: `torch.cuda.Stream()` for its device-to-host copies, `current_stream()`,
    `torch.cuda.stream(s)`."""
    current = _Stream()
    torch.cuda.Stream = _Stream  # type: ignore[misc, assignment]
    torch.cuda.current_stream = lambda *a, **k: current  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]


def patch_moe_split_sizes() -> None:
    """MoE all-to-all: split sizes become host lists only for CUDA tensors (`maybe_move_tensor_to_cpu`); gloo's
    `all_to_all_single` refuses CPU tensors there, so CPU tensors take the same `.numpy()` path."""
    import megatron.core.transformer.moe.moe_utils as mu
    import megatron.core.transformer.moe.token_dispatcher as td

    def to_host(t: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        return t.numpy() if as_numpy and torch.is_tensor(t) else t

    mu.maybe_move_tensor_to_cpu = td.maybe_move_tensor_to_cpu = to_host


class CudaToCpuMode(TorchFunctionMode):
    """mcore's DDP/optimizer/grad-clip path has literal 'cuda' devices and asserts `.type()` is a cuda type:
    rewrite the devices to CPU and report CPU tensors under their cuda type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to and args[1:] and str(args[1]).startswith("cuda"):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def apply(seed: int) -> None:
    """Install every patch; call after `initialize_model_parallel` (the RNG tracker needs the TP rank)."""
    check_version()
    patch_current_device()
    patch_synchronize()
    patch_default_causal_mask()
    patch_rng_tracker(seed)
    patch_cuda_streams()
    patch_moe_split_sizes()
    if not _MODE:
        _MODE.append(CudaToCpuMode())
        _MODE[0].__enter__()
