"""Everything besides the trainer that a checkpoint must hold for a resumed run to take exactly the steps an
uninterrupted run would have: data position, buffer, sampling-seed counters, Python's RNG, the weight version
the engines hold, and the metrics history."""

from __future__ import annotations

import random
from typing import Any

from vime.parts import Parts


def state_dict(run: Parts, step: int) -> dict[str, Any]:
    return {
        "step": step,
        "version": run.sync.version,
        "source": run.source.state_dict(),
        "buffer": run.buffer.state_dict(),
        "rollout_counters": dict(run.ctx.counters),
        "python_rng": list(random.getstate()[1]),
        "metrics": run.metrics.history,
    }


def load_state_dict(run: Parts, state: dict[str, Any]) -> int:
    """Restore `state` into the running parts; returns the step to continue from."""
    run.source.load_state_dict(state["source"])
    run.buffer.load_state_dict(state["buffer"])
    run.ctx.counters = dict(state["rollout_counters"])
    random.setstate((3, tuple(state["python_rng"]), None))
    run.metrics.restore(state["metrics"])
    return int(state["step"])
