"""The trainer's end of SGLang's weight-update group. SGLang's server joins with its `init_custom_process_group`
(a torch rendezvous on `tcp://address:port`, the store prefixed by the group's name, a process group built beside
the default one); the sender must join the same way as rank 0, which also hosts the store. Written from reading
SGLang 0.5.17 (`sglang/srt/utils/common.py`); checked against the real server on the GPU."""

from __future__ import annotations

from datetime import timedelta
from typing import Any


def join_group(
    backend: str, address: str, port: int, world_size: int, rank: int, group_name: str, timeout_s: float
) -> Any:
    """Blocks until all `world_size` ranks have joined (the servers join when their HTTP call arrives)."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{address}:{port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        PrefixStore(group_name, store),
        group_name=group_name,
        backend_options=None,
        timeout=timeout,
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg
