"""Client side of rollout routing replay (R3): the routes each server recorded for a request, merged into one
int16 `[position, layer, k]` array per sampled child (`vime.types.Routes`).

A request is tagged in its sampling params' `extra_args` (ROUTES_TAG; not its id, which a P/D router replaces
with its own) and leaves records under vLLM's internal ids: `k_<id>` for child k of an n > 1 request. Under P/D
the prefill server holds the prompt's positions (under a child-less id when n = 1) and the decode server the
rest; a position computed on both (the last prompt token, which the decode server recomputes) keeps the later
server's routes: those produced the sampled token.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

CHILD = re.compile(r"^(\d+)_")
ROUTES_TAG = "vime_routes"  # the key of the request's tag in its sampling params' extra_args


class RoutesError(RuntimeError):
    pass


def merge(per_server: list[dict[str, dict[str, list[Any]]]], n: int, lengths: list[int]) -> list[np.ndarray]:
    """`per_server`: each server's `take` answer, in prefill-then-decode order; `lengths[k]`: the positions child
    k must cover (prompt + response - 1). Returns each child's routes or raises naming the gap."""
    shared: dict[int, Any] = {}
    own: list[dict[int, Any]] = [{} for _ in range(n)]
    for found in per_server:
        for key, rec in found.items():
            m = CHILD.match(key)
            target = own[int(m.group(1))] if m and n > 1 and int(m.group(1)) < n else shared
            target.update(zip(rec["positions"], rec["experts"], strict=True))
    out = []
    for k, want in enumerate(lengths):
        routes = {**shared, **own[k]}
        missing = [p for p in range(want) if p not in routes]
        if missing:
            raise RoutesError(
                f"child {k}: no routes for {len(missing)} of {want} positions (first {missing[:6]}); a prefix-cache "
                "hit skips the prompt's, so routing replay needs engine.args.enable_prefix_caching: false"
            )
        out.append(np.asarray([routes[p] for p in range(want)], dtype=np.int16))
    return out


def from_npy_b64(blob: str, want: int) -> np.ndarray:
    """vLLM's own routed experts (`enable_return_routed_experts`, the GPU line): base64 `.npy` bytes of
    [prompt + response - 1, layers, k]."""
    import base64
    import io

    arr = np.load(io.BytesIO(base64.b64decode(blob)), allow_pickle=False)
    if arr.ndim != 3 or arr.shape[0] < want:
        raise RoutesError(f"the engine's routed_experts has shape {arr.shape}; expected ({want}, layers, k)")
    return arr[:want].astype(np.int16)
