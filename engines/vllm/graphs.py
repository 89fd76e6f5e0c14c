"""Fixed kernel sequences over tensors that stay where they are, launched as one CUDA graph.

A push's engine side is hundreds of small kernels over the same parameters every time (the copies of a recorded
load, the bit sum of each parameter); launched from Python each costs ~10-20 µs of the CPU, which for a 0.5B
model is most of what they cost. Captured once, they replay in one launch. Off CUDA, or where capture fails,
the function simply runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


def captured(launch: Callable[[], T], device: torch.device) -> Callable[[], T]:
    """`launch` as one CUDA graph; calling the result replays it and returns the tensors the capture produced
    (refilled by each replay). `launch` must only touch tensors that outlive the graph and never move."""
    if device.type != "cuda":
        return launch
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            launch()  # warm-up: lazily loaded kernels load outside the capture
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            out = launch()
    except Exception as e:  # noqa: BLE001 - not capturable here (another stream busy, an op that syncs): run it as is
        logger.warning("not captured as a CUDA graph, launched one kernel at a time: %s: %s", type(e).__name__, e)
        return launch

    def replay() -> T:
        graph.replay()
        return out

    return replay
