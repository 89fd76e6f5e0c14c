"""Bad items of a rollout are skipped and counted, not fatal: a reward that raises, a prompt too long for the
engine, an agent that fails before its first model call. Each is logged once per kind with its cause, counted in
the step's metrics (`failed/<kind>`), and past `rollout.max_failures` in a run the run stops with the first cause,
so a broken plug-in cannot quietly train on nothing."""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class RolloutFailure(RuntimeError):
    """More bad items than `rollout.max_failures` allows; the message holds the first one's cause."""


@dataclass
class Faults:
    bound: int = 64
    counts: dict[str, int] = field(default_factory=dict)  # this step's, by kind
    total: int = 0  # this run's
    first: str | None = None
    logged: set[str] = field(default_factory=set)

    def record(self, kind: str, what: str, error: BaseException | None = None, skipped: bool = True) -> None:
        """`skipped=False`: the item is still trained on (an agent that raised after its model calls: a real
        outcome, reward 0), so it counts in the step's metrics and failure rate, not towards the run's bound."""
        detail = what if error is None else f"{what}: {type(error).__name__}: {error}"
        if kind not in self.logged:
            self.logged.add(kind)
            log.warning(
                "%s; skipped and counted as failed/%s (rollout.max_failures: %d)",
                detail,
                kind,
                self.bound,
                exc_info=error,
            )
        if self.first is None:
            cause = "".join(traceback.format_exception(error)) if error is not None else ""
            self.first = f"{detail}\n{cause}".rstrip()
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if not skipped:
            return
        self.total += 1
        if self.total > self.bound:
            raise RolloutFailure(
                f"{self.total} bad items in this run, more than rollout.max_failures={self.bound}; the first was: "
                f"{self.first}"
            )

    def failed(self) -> int:
        """Bad items counted since the last `take` (a step reads it before and after itself)."""
        return sum(self.counts.values())

    def check_step(self, step: int, expected: int, generated: int, failed: int, max_rate: float) -> None:
        """A step that produced nothing, or whose `failed` items are more than `max_rate` of them, stops the run with
        the first cause: training on nothing (or on the few that survived a broken plug-in) must not look like
        success."""
        if generated == 0:
            raise RolloutFailure(
                f"step {step + 1}: the rollout produced no samples ({expected} expected); the first failure: "
                f"{self.first or 'none recorded (check the rollout function)'}"
            )
        if expected and failed / expected > max_rate:
            raise RolloutFailure(
                f"step {step + 1}: {failed} of {expected} rollout items failed, more than "
                f"rollout.max_failure_rate={max_rate}; the first failure: {self.first}"
            )

    def take(self) -> dict[str, float]:
        """This step's counts (then zeroed), for the step's metrics."""
        out = {f"failed/{k}": float(v) for k, v in self.counts.items()}
        self.counts = {}
        return out
