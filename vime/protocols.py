"""The contracts between vime's parts. Implementations live in `engines/` and `trainers/` (or a user's package)
and are found by name or import path (`vime.registry`); nothing in `vime/` imports them.

The Engine protocol is shaped so that both vLLM's HTTP API (`/inference/v1/generate`, `/pause`, `/resume`,
weight-transfer routes) and SGLang's (`/generate` with `input_ids`, `/pause_generation`, `/continue_generation`,
`/update_weights_from_*`) fit it without change: token ids in, token ids + sampled log-probs out.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Protocol, Sequence, runtime_checkable

from vime.types import Completion, Group, Sample, SamplingParams


@runtime_checkable
class Engine(Protocol):
    """One inference server (or one P/D pair behind a router), reachable on loopback only."""

    base_url: str

    async def generate(self, prompts: list[list[int]], params: SamplingParams,
                       session: str | None = None) -> list[list[Completion]]:
        """For each prompt, `params.n` completions; child k of a seeded request uses seed + k. `session` lets a
        router behind the engine keep a conversation on one server."""
        ...

    async def pause(self, mode: str = "keep") -> None:
        """Stop scheduling: `keep` freezes in-flight requests, `abort` returns them partial, `wait` drains."""
        ...

    async def resume(self) -> None: ...

    async def weight_version(self) -> str: ...

    async def healthy(self) -> bool: ...


@runtime_checkable
class EngineGroup(Protocol):
    """Owns the engine processes: start/stop, and where requests go."""

    engines: Sequence[Engine]

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def pick(self, key: str | None = None) -> Engine:
        """The engine for a request; the same `key` (session id) always maps to the same engine."""
        ...


@runtime_checkable
class WeightChannel(Protocol):
    def connect(self, engines: Sequence[Engine]) -> None: ...

    def push(self, tensors: Iterable[tuple[str, Any]], version: str) -> dict[str, float]:
        """Pause, stream HF-named tensors, resume; every engine reports `version` before it returns."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Trainer(Protocol):
    def logprobs(self, samples: list[Sample]) -> list[list[float]]: ...

    def train_step(self, samples: list[Sample], loss: str) -> dict[str, float]: ...

    def weights(self, bucket_bytes: int) -> Iterator[list[tuple[str, Any]]]:
        """HF-named full tensors in buckets of at most `bucket_bytes` (the sender side of a WeightChannel)."""
        ...

    def release_memory(self) -> None:
        """Return cached accelerator memory, so an engine sharing the device can wake into it."""
        ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...


class RewardFn(Protocol):
    def __call__(self, sample: Sample) -> float: ...


class GroupFilter(Protocol):
    def __call__(self, group: Group) -> bool:
        """True keeps the group."""
        ...


class RolloutFn(Protocol):
    async def __call__(self, prompts: list[dict[str, Any]], ctx: Any) -> list[Group]:
        """Turn a batch of prompt records into scored groups. `ctx` is a `vime.rollout.RolloutContext`."""
        ...
