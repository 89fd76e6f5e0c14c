"""A recorded `load_weights`, replayed: the engine side of the ipc push without vLLM's per-parameter Python.

vLLM's `model.load_weights` walks every HF tensor through its parameter's weight loader (name mapping, the
stacked q/k/v and gate/up shards, padding): ~20 ms of Python for a 0.5B model's 290 tensors, most of a push.
Yet with the staging buffer (and the trainer's resident weights, read in place) mapped once, every push of the
same layout does the same thing: it copies the same byte ranges of the same sources into the same slices of the
same parameters. So the first push of a layout runs
`load_weights` under a dispatch mode that records every write it makes to the model's memory; the next pushes
replay those copies (as one CUDA graph on a GPU; there by a kernel that sums what it copies, so the push's check
need not read the parameters again). A recording is used only if every write was a copy out of a
source or a constant fill (the vocab rows past the checkpoint's) into a parameter or buffer, and no parameter was
swapped for a new tensor — anything else (a loader that converts, transposes or post-processes) leaves that
layout on `load_weights`, with the reason kept. Replay is bit-for-bit what `load_weights` wrote, and every push
is still checked by the weight sums after it.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engines.vllm import word_sums
from engines.vllm.graphs import captured

aten = torch.ops.aten
COPIES = {aten.copy_.default}
FILLS = {aten.fill_.Scalar: lambda args: args[1], aten.zero_.default: lambda args: 0}


@dataclass(frozen=True)
class Slice:
    """A strided piece of one named tensor: element offset, sizes, strides."""

    owner: str
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def _writes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if isinstance(value, torch.Tensor):
                out.append(value)
    return out


class Memory:
    """Which named tensor (parameter or buffer) an address lies in."""

    def __init__(self, named: dict[str, torch.Tensor]) -> None:
        spans = sorted(
            (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), n) for n, t in named.items() if t.numel()
        )
        self.starts = [s for s, _, _ in spans]
        self.spans = spans
        self.named = named

    def slice_of(self, t: torch.Tensor) -> Slice | str | None:
        """The piece of a named tensor `t` is (None: not the model's memory; a string: why it cannot be named)."""
        i = bisect.bisect_right(self.starts, t.data_ptr()) - 1
        if i < 0 or t.data_ptr() >= self.spans[i][1]:
            return None
        start, _, name = self.spans[i]
        if self.named[name].dtype != t.dtype or (t.data_ptr() - start) % t.element_size():
            return f"{name} is written as {t.dtype} at byte {t.data_ptr() - start}"
        return Slice(name, (t.data_ptr() - start) // t.element_size(), tuple(t.shape), tuple(t.stride()), t.dtype)


Copy = tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype]  # source index, byte offset, size, stride, dtype


class Recorder(TorchDispatchMode):
    """Records the writes an op sequence makes into `memory`: copies out of `sources` (flat byte buffers: the staging
    buffer, the trainer's resident weights) and constant fills."""

    def __init__(self, memory: Memory, sources: list[torch.Tensor]) -> None:
        super().__init__()
        self.memory = memory
        self.spans = [(s.data_ptr(), s.data_ptr() + s.numel() * s.element_size()) for s in sources]
        # in the order they happened: (dst, the copy's source) or (dst, fill value)
        self.writes: list[tuple[Slice, Copy | float]] = []
        self.problem: str | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        try:
            for dst in _writes(func, args, kwargs):
                self._note(func, args, dst)
        except Exception as e:  # noqa: BLE001 - a recording that cannot follow an op only costs the replay
            self.problem = self.problem or f"{func} could not be recorded: {type(e).__name__}: {e}"
        return func(*args, **kwargs)

    def _note(self, func: Any, args: tuple[Any, ...], dst: torch.Tensor) -> None:
        if self.problem is not None or dst.numel() == 0:
            return
        where = self.memory.slice_of(dst)
        if where is None:  # a temporary the loader made: not the model's memory
            return
        if isinstance(where, str):
            self.problem = where
            return
        src = args[1] if func in COPIES else None
        i = self._source_of(src, dst) if isinstance(src, torch.Tensor) else None
        if src is not None and i is not None:
            where_from = src.data_ptr() - self.spans[i][0]
            self.writes.append((where, (i, where_from, tuple(src.shape), tuple(src.stride()), src.dtype)))
            return
        if func in FILLS:
            value = FILLS[func](args)
            if isinstance(value, (int, float)):
                self.writes.append((where, float(value)))
                return
        self.problem = (
            f"{where.owner} is written by {func}, not as a plain copy out of a source (a conversion, a temporary)"
        )

    def _source_of(self, src: torch.Tensor, dst: torch.Tensor) -> int | None:
        """Which source a plain copy reads (same dtype and shape: no conversion, no broadcast to replay)."""
        if src.dtype != dst.dtype or src.shape != dst.shape:
            return None
        return next((i for i, (lo, hi) in enumerate(self.spans) if lo <= src.data_ptr() < hi), None)


def model_memory(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def pointers(named: dict[str, torch.Tensor]) -> dict[str, int]:
    return {n: t.data_ptr() for n, t in named.items()}


def extent(s: Slice) -> tuple[str, int, int]:
    """The element range [start, end) of its owner a slice can touch."""
    return s.owner, s.offset, s.offset + 1 + sum((n - 1) * st for n, st in zip(s.size, s.stride) if n)


class Words(NamedTuple):
    """A copy of whole aligned words, made by the word-sum kernel: it adds what it writes into `slot`."""

    src: torch.Tensor
    dst: torch.Tensor
    slot: int


Step = list[tuple[torch.Tensor, torch.Tensor]] | tuple[torch.Tensor, float] | Words


class LoadPlan:
    """The writes one layout's `load_weights` made, in their order, bound to live tensors and launched as one
    graph: on a GPU each copy of whole words by the word-sum kernel (`word_sums.py`), which also sums what it
    writes per parameter; other runs of copies into disjoint places as one multi-tensor copy each, fills between
    them as they came. A parameter that the kernel wrote whole, each word once, has its bit sum from the replay
    (`sums`) without being read again."""

    def __init__(self, recorder: Recorder, named: dict[str, torch.Tensor], sources: list[torch.Tensor]) -> None:
        self.ptrs = {dst.owner: named[dst.owner].data_ptr() for dst, _ in recorder.writes}  # must not move
        self.owners = sorted(self.ptrs)
        slot = {o: i for i, o in enumerate(self.owners)}
        device = sources[0].device
        self.out = torch.zeros(len(self.owners), dtype=torch.int32, device=device)
        fast = word_sums.usable(device)
        self.steps: list[Step] = []
        spans: dict[str, list[tuple[int, int]]] = defaultdict(list)  # the byte ranges the kernel wrote, per owner
        unsummed: set[str] = set()  # owners also written some other way
        touched: list[tuple[str, int, int]] = []  # what the current run of copies writes
        for dst, what in recorder.writes:
            view = _view(named, dst)
            if isinstance(what, float):
                self.steps.append((view, what))
                unsummed.add(dst.owner)
                continue
            src = _source_view(sources, what)
            src_words, dst_words = (word_sums.words(src), word_sums.words(view)) if fast else (None, None)
            if src_words is not None and dst_words is not None:
                self.steps.append(Words(src_words, dst_words, slot[dst.owner]))
                start = dst.offset * dst.dtype.itemsize
                spans[dst.owner].append((start, start + view.numel() * view.element_size()))
                continue
            unsummed.add(dst.owner)
            owner, lo, hi = extent(dst)
            run = self.steps[-1] if self.steps and isinstance(self.steps[-1], list) else None
            if run is None or any(o == owner and lo < b and a < hi for o, a, b in touched):
                run, touched = [], []  # a write over an earlier one of the run must come after it
                self.steps.append(run)
            run.append((view, src))
            touched.append((owner, lo, hi))
        self.summed = [o for o in self.owners if o not in unsummed and _whole(spans[o], named[o])]
        self.copies = sum(len(s) if isinstance(s, list) else isinstance(s, Words) for s in self.steps)
        self.fills = sum(isinstance(s, tuple) and not isinstance(s, Words) for s in self.steps)
        self.graph = captured(self._launch, device)

    def _launch(self) -> torch.Tensor:
        self.out.zero_()
        for step in self.steps:
            if isinstance(step, Words):
                word_sums.launch(step.src, self.out, step.slot, step.dst)
            elif isinstance(step, list):
                torch._foreach_copy_([d for d, _ in step], [s for _, s in step])
            else:
                step[0].fill_(step[1])
        return self.out

    def valid_for(self, named: dict[str, torch.Tensor]) -> bool:
        """Whether the tensors it writes into are still where they were recorded (none swapped or reallocated)."""
        return all(n in named and named[n].data_ptr() == p for n, p in self.ptrs.items())

    def replay(self) -> None:
        self.graph()

    def sums(self) -> dict[str, int]:
        """`fingerprint.bit_sum` (mod 2³²) of each parameter the last replay wrote whole with the kernel."""
        if not self.summed:
            return {}
        got = dict(zip(self.owners, self.out.tolist()))
        return {o: got[o] % (1 << 32) for o in self.summed}


def _whole(spans: list[tuple[int, int]], t: torch.Tensor) -> bool:
    """Whether byte ranges tile all of `t`, each byte once, and their word sums add up to its `bit_sum` (2- and
    4-byte elements read as 4-byte words from its start; 1- and 8-byte elements are summed otherwise)."""
    if t.element_size() not in (2, 4) or not spans:
        return False
    end = 0
    for lo, hi in sorted(spans):
        if lo != end:
            return False
        end = hi
    return end == t.numel() * t.element_size()


def _view(named: dict[str, torch.Tensor], s: Slice) -> torch.Tensor:
    return named[s.owner].detach().as_strided(s.size, s.stride, named[s.owner].storage_offset() + s.offset)


def _source_view(sources: list[torch.Tensor], c: Copy) -> torch.Tensor:
    i, off, size, stride, dtype = c
    span = (1 + sum((n - 1) * st for n, st in zip(size, stride) if n)) * dtype.itemsize
    return sources[i].view(torch.uint8)[off : off + span].view(dtype).as_strided(size, stride)


def record(model: torch.nn.Module, sources: list[torch.Tensor], load: Callable[[], None]) -> LoadPlan | str:
    """Run `load` (a `load_weights` over views of `sources`) recording it; the plan, or why it cannot replay."""
    named = model_memory(model)
    before = pointers(named)
    rec = Recorder(Memory(named), sources)
    with torch.no_grad(), rec:
        load()
    after = model_memory(model)
    if pointers(after) != before:
        moved = sorted(n for n in after if before.get(n) != after[n].data_ptr())
        return f"load_weights replaced {moved[:3]} (not an in-place load)"
    if rec.problem:
        return rec.problem
    try:
        with torch.no_grad():
            return LoadPlan(rec, after, sources)
    except Exception as e:  # noqa: BLE001 - e.g. a view it cannot rebuild (an unaligned piece of the buffer)
        return f"the recorded copies cannot be replayed: {e}"
