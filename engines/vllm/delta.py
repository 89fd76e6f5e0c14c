"""Delta pushes (`weights.delta`): only the elements whose bits changed since the version every engine holds
travel, as index/value pairs per tensor; a tensor whose delta would not be smaller than itself travels whole.

Both ends keep the last pushed tensors in HF layout (the sender on its host, each engine worker beside its model),
so an engine rebuilds the new tensor exactly — bit patterns are compared, not values, so -0.0, NaNs and sub-ulp
updates are no special cases — and loads it through the same `load_weights` as a full push. What is saved is the
wire, the bandwidth-limited part (gloo between hosts); the engine's load stays a full load. Each rebuilt tensor is
checked against the sender's exact bit-pattern sum and a mismatch fails the push naming it, so a wrong base never
passes silently; the sender pushes in full whenever an engine does not report holding the version the delta would
be against (restarted, written by another channel, or a push that did not finish). The price is one more copy of
the weights in host memory on each side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engines.vllm.cpu_threads import one_thread

BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
FULL = -1  # a tensor's entry in `counts` when it travels whole


def bits(t: torch.Tensor) -> torch.Tensor:
    """The flat bit patterns of `t`, as integers of its width."""
    return t.detach().contiguous().view(-1).view(BITS[t.element_size()])


def _words(t: torch.Tensor) -> torch.Tensor | None:
    """`t`'s whole 8-byte words as int64 (None where its bytes are not 8-aligned): comparing and summing native
    words is 4× fewer elements than bf16 ones, and an int16 → int64 widening sum is the slowest part otherwise."""
    raw = t.detach().contiguous().view(-1).view(torch.uint8)
    if raw.data_ptr() % 8:
        return None
    return raw[: raw.numel() // 8 * 8].view(torch.int64)


def bit_sum(t: torch.Tensor) -> int:
    """An exact checksum of the bytes (their 8-byte words added modulo 2**64, the rest bytewise): any single
    changed element changes it, and it is independent of the order of addition."""
    raw = t.detach().contiguous().view(-1).view(torch.uint8)
    words = _words(t)
    if words is None:
        words = raw[: raw.numel() // 8 * 8].clone().view(torch.int64)
    rest = raw[words.numel() * 8 :]
    return int(words.sum().item()) + int(rest.sum(dtype=torch.int64).item())


def changed(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Flat indices of the elements whose bits differ: whole 8-byte words first, elements only inside the few
    words that differ."""
    a, b = bits(new), bits(old)
    wa, wb = _words(a), _words(b)
    if wa is None or wb is None:
        return (a != b).nonzero().squeeze(1)
    per = 8 // a.element_size()
    hit = (wa != wb).nonzero().squeeze(1)
    idx = (hit.unsqueeze(1) * per + torch.arange(per)).view(-1)
    idx = idx[a[idx] != b[idx]]
    cut = wa.numel() * per
    return torch.cat([idx, cut + (a[cut:] != b[cut:]).nonzero().squeeze(1)])


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def wire_bytes(count: int, numel: int, element_size: int) -> int:
    """Bytes one tensor's entry takes on the wire."""
    if count == FULL:
        return numel * element_size
    return count * (torch.empty((), dtype=index_dtype(numel)).element_size() + element_size)


@dataclass
class Encoded:
    count: int  # FULL, or how many (index, value) pairs travel
    changed: int  # elements whose bits differ from the base (all of them without a base)
    payload: list[torch.Tensor]  # what goes on the wire, in order
    check: int  # bit_sum of the new tensor


def encode(new: torch.Tensor, old: torch.Tensor | None) -> Encoded:
    """FULL with [new] when there is no comparable base or the delta would not be smaller; else the changed
    elements' flat indices and new values."""
    flat = new.detach().contiguous().view(-1)
    check = bit_sum(flat)
    if old is None or old.shape != new.shape or old.dtype != new.dtype:
        return Encoded(FULL, flat.numel(), [flat], check)
    where = changed(flat, old.to(flat.device).view(-1))
    n = where.numel()
    if wire_bytes(n, flat.numel(), flat.element_size()) >= flat.numel() * flat.element_size():
        return Encoded(FULL, n, [flat], check)
    return Encoded(n, n, [where.to(index_dtype(flat.numel())), flat[where]], check)


def typed(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 bytes as `dtype`: a view where the bytes are aligned for it, else a copy (tensors of different widths
    sit end to end in one buffer, so a 4-byte index can start at an odd 2-byte offset)."""
    if raw.storage_offset() % torch.empty((), dtype=dtype).element_size():
        raw = raw.clone()
    return raw.view(dtype)


def apply(held: torch.Tensor, payload: torch.Tensor, count: int) -> None:
    """Write one delta (the bytes `encode` sent: indices, then values) into `held` in place."""
    idx_dtype = index_dtype(held.numel())
    cut = count * torch.empty((), dtype=idx_dtype).element_size()
    held.view(-1)[typed(payload[:cut], idx_dtype).long()] = typed(payload[cut:], held.dtype)


@dataclass
class Base:
    """The tensors a side last pushed or received, and the version they make up (None: not a whole, trusted one)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    version: str | None = None
    against: str | None = None  # engine side: the version held when the current push started

    def keep(self, name: str, t: torch.Tensor) -> None:
        held = self.tensors.get(name)
        if held is not None and held.shape == t.shape and held.dtype == t.dtype:
            held.copy_(t)
        else:
            self.tensors[name] = t.detach().to("cpu", copy=True).contiguous()


def encode_bucket(
    base: Base, bucket: list[tuple[str, torch.Tensor]], against: str | None, stats: dict[str, int]
) -> tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]:
    """The sender's side of one bucket: per tensor its changed elements against `base` (the whole tensor when
    `against` is None: no version every engine holds), the update's extra fields and the wire; the tensors become
    the next base, and `stats` counts elements, changed elements and full bytes."""
    counts, checks, wire = [], [], []
    with one_thread(all(t.device.type == "cpu" for _, t in bucket)):
        for name, t in bucket:
            enc = encode(t, base.tensors.get(name) if against is not None else None)
            counts.append(enc.count)
            checks.append(enc.check)
            wire += [(name, p) for p in enc.payload]
            stats["elements"] += t.numel()
            stats["changed"] += enc.changed
            stats["full_bytes"] += t.numel() * t.element_size()
            base.keep(name, t)
    return {"counts": counts, "checks": checks, "base": against, "keep": True}, wire


def report(stats: dict[str, int], against: str | None) -> dict[str, float]:
    return {
        "delta": float(against is not None),  # 0: pushed in full (no base every engine holds)
        "changed_frac": stats["changed"] / max(1, stats["elements"]),
        "full_bytes": float(stats["full_bytes"]),
    }
