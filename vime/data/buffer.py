"""The buffer between rollout and training: groups go in, pass the filters, and come out as training batches."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from vime.registry import Registry
from vime.types import Group, Sample


def drop_uniform_reward(group: Group) -> bool:
    """Keep a group only if its rewards differ: with equal rewards every group-relative advantage is 0."""
    rewards = {s.reward for s in group}
    return len(rewards) > 1


FILTERS: Registry[Callable[[Group], bool]] = Registry(
    "group filter", "rollout.group_filters", {"drop_uniform_reward": drop_uniform_reward}, n_args=1
)


class DataBuffer:
    """Thread-safe: in the async loop a rollout thread adds while the trainer's thread waits for a batch."""

    def __init__(self, filters: Iterable[Callable[[Group], bool]] = ()):
        self.filters = list(filters)
        self._groups: deque[Group] = deque()
        self.stats = {"groups_in": 0, "groups_dropped": 0}
        self.changed = threading.Condition()

    def add(self, groups: Iterable[Group]) -> int:
        kept = 0
        with self.changed:
            for g in groups:
                self.stats["groups_in"] += 1
                if all(f(g) for f in self.filters):
                    self._groups.append(g)
                    kept += 1
                else:
                    self.stats["groups_dropped"] += 1
            self.changed.notify_all()
        return kept

    def wait_for(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Block until `ready()` (checked under the lock, after every change) or fail naming what was awaited."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"waited {timeout_s:.0f} s for {what}; the buffer holds {len(self)} groups")
                self.changed.wait(min(left, 1.0))

    def __len__(self) -> int:
        return len(self._groups)

    def num_samples(self) -> int:
        return sum(len(g) for g in self._groups)

    def pop_groups(self, n: int | None = None) -> list[Group]:
        with self.changed:
            n = len(self._groups) if n is None else min(n, len(self._groups))
            out = [self._groups.popleft() for _ in range(n)]
            self.changed.notify_all()
        return out

    def trim(self, n: int) -> int:
        """Keep the first `n` groups; the number of samples dropped."""
        dropped = 0
        with self.changed:
            while len(self._groups) > n:
                dropped += len(self._groups.pop())
        return dropped

    def state_dict(self) -> dict[str, Any]:
        with self.changed:
            return {"groups": [[s.to_dict() for s in g] for g in self._groups], "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self.changed:
            self._groups = deque([Sample.from_dict(d) for d in g] for g in state["groups"])
            self.stats = dict(state["stats"])
