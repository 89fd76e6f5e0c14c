"""The contracts between vime's parts: exactly what orchestration (`vime/`) calls, with the signatures it uses.

Implementations live in `engines/<name>/` and `trainers/<name>/` (or a user's package) and are found through a
registered spec (`vime.registry.ENGINES` / `TRAINERS`); nothing in `vime/` imports them. Each spec's factory is
annotated with these protocols, so the type checker proves an implementation fits, and `tests/test_contracts.py`
drives the real implementations through exactly the declared members.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from vime.engine import EngineConfig
from vime.trainer import CriticConfig, TrainerConfig
from vime.types import Completion, Group, Sample, SamplingParams
from vime.weights import WeightsConfig

Bucket = list[tuple[str, Any]]  # HF-named full tensors, sent together


@runtime_checkable
class Engine(Protocol):
    """Where one request goes: a server, or a router over servers. Token ids in, token ids + log-probs out, so
    nothing is ever re-tokenised between the engine and the trainer."""

    @property
    def base_url(self) -> str: ...

    async def generate(
        self, prompts: list[list[int]], params: SamplingParams, session: str | None = None
    ) -> list[list[Completion]]:
        """For each prompt, `params.n` completions; child k of a seeded request uses seed + k. `session` lets a
        router behind the engine keep a conversation on one server (its prefix cache stays warm)."""
        ...

    def stream(
        self, prompt: list[int], params: SamplingParams, session: str | None = None
    ) -> AsyncIterator[Completion]:
        """One completion (`params.n` is 1) as it grows: each item is the whole completion so far, the last one
        has its finish reason and weight versions. What a streaming client reads as the tokens are sampled."""
        ...

    async def healthy(self) -> bool:
        """Cheap enough to ask before every request (the gateway skips unhealthy engines)."""
        ...


@runtime_checkable
class EnginePool(Protocol):
    """Where requests go: all that a rollout function and the gateway see of the engines (a supervised pool
    re-issues a request whose engine died, so they never need to know)."""

    @property
    def engines(self) -> Sequence[Engine]: ...

    def pick(self, key: str | None = None) -> Engine:
        """The engine for a request; the same `key` (a session id) always maps to the same engine."""
        ...


@runtime_checkable
class EngineGroup(EnginePool, Protocol):
    """Owns every engine process of a run: they start and stop together, and the group knows where a request
    goes (`engines`, `pick`) and where weights go (`urls`): these differ when a router fronts the servers."""

    def start(self) -> EngineGroup: ...

    def stop(self) -> None:
        """Idempotent, and leaves no process behind."""
        ...

    def urls(self) -> list[str]:
        """Every server that holds weights (not a router): the weight channel's destinations."""
        ...

    def dead(self) -> list[int]:
        """Indices of servers whose process has exited; cheap (no request)."""
        ...

    def restart(self, i: int) -> None:
        """Replace server `i` by a fresh one at the same URL, with the model directory's weights: after a failed
        push the caller reconnects the channel and pushes again."""
        ...

    def sleep(self, level: int = 1) -> None:
        """Colocated on a GPU: give the servers' memory to the trainer until `wake_up`."""
        ...

    def wake_up(self, tags: list[str] | None = None) -> None:
        """`["weights"]` before a push, `["kv_cache"]` after it; None: everything."""
        ...

    def note_weight_version(self, version: str) -> None:
        """The version just pushed, for engines that cannot report one themselves (they tag new tokens with it)."""
        ...

    def step_metrics(self) -> dict[str, float]:
        """Cumulative engine counters (`kv/*`, `ttft/sum|count`) and gauges (`engines/*`); the loop logs deltas."""
        ...


class WeightChannel(Protocol):
    """The sender side of in-place weight transfer. It lives where the tensors are (trainer rank 0), so vime
    never holds it: the trainer builds it from the engine's spec (`EngineSpec.weight_channel`) and drives it."""

    def connect(self) -> None: ...

    def push(self, buckets: Iterable[Bucket], version: str) -> dict[str, float]:
        """Pause, stream the buckets, resume; every server reports `version` before it returns. Raises
        `WeightPushError` when servers may hold partial weights (they must be restarted, never resumed)."""
        ...

    def close(self) -> None: ...


class WeightChannelFactory(Protocol):
    """What `EngineSpec.weight_channel` names: built in the trainer's process from plain data."""

    def __call__(self, cfg: dict[str, Any], urls: list[str]) -> WeightChannel: ...


class Trainer(Protocol):
    """Owns the weights and the optimiser (one handle over all ranks)."""

    def logprobs(self, samples: list[Sample], temperature: float = 1.0, reference: bool = False) -> list[list[float]]:
        """Per response token, under the current weights and the sampling temperature; `reference`: under the
        frozen initial weights instead (the KL term's reference policy)."""
        ...

    def train_step(
        self,
        samples: list[Sample],
        loss: str,
        loss_kwargs: Mapping[str, Any] | None = None,
        *,
        old_logprobs: list[list[float]] | None = None,
        ref_logprobs: list[list[float]] | None = None,
        temperature: float = 1.0,
    ) -> dict[str, float]:
        """One optimiser step over `samples` with the named loss (`vime.algorithms.losses.LOSSES`)."""
        ...

    def set_lr(self, lr: float) -> None: ...

    def reset_optimizer(self) -> None:
        """Forget the optimiser's moments and restart its schedule (warm-up included), so a new phase (RL after the
        SFT warm start) starts as a separate run would: carried over, the warm start's second moments set the size
        of RL's first updates."""
        ...

    def connect_weights(self, channel: str, cfg: dict[str, Any], urls: list[str]) -> None:
        """Open the weight channel `channel` (a `WeightChannelFactory` import path) where the tensors are."""
        ...

    def push_weights(self, version: str) -> dict[str, float]:
        """Send every weight through the open channel; raises `WeightPushError` (unwrapped from the trainer's
        process) when the engines must be restarted."""
        ...

    def release_memory(self) -> None:
        """Return cached accelerator memory, so an engine sharing the device can wake into it."""
        ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...

    def save_hf(self, out_dir: str) -> str:
        """The current weights as an HF model directory (for checkpoints users can load anywhere)."""
        ...

    def shutdown(self) -> None: ...


class Critic(Protocol):
    """PPO's value model (one handle over its ranks): it scores states and learns returns; it never generates, and
    its weights never go to the engines."""

    def values(self, samples: list[Sample]) -> list[list[float]]:
        """Per response token, V of the state that token was sampled in."""
        ...

    def train_step(
        self,
        samples: list[Sample],
        returns: list[list[float]],
        old_values: list[list[float]],
        loss_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, float]:
        """One optimiser step of the clipped value loss (`vime.algorithms.value`) towards `returns`."""
        ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...

    def shutdown(self) -> None: ...


class EngineSpec(Protocol):
    """Everything vime needs to know about one engine, registered by name in `vime.registry.ENGINES`."""

    name: str
    config: type[EngineConfig]  # the engine section's schema (extends EngineConfig)
    weight_channel: str  # import path of its WeightChannelFactory
    weight_backends: Mapping[str, str]  # weights.backend values it offers -> one line each

    def validate(self, engine: EngineConfig, weights: WeightsConfig, colocate: bool) -> list[str]:
        """Rules across sections (e.g. a backend that needs colocation); each error names the keys to change."""
        ...

    def context_limit(self, engine: EngineConfig) -> int | None:
        """Prompt + completion tokens a request may hold, as the engine's flags set it (None: not set)."""
        ...

    def make_group(
        self,
        cfg: EngineConfig,
        *,
        model_path: str,
        log_dir: str,
        weights_backend: str | None = None,
        placement: tuple[Any, list[int]] | None = None,
        sleep_mode: bool = False,
    ) -> EngineGroup:
        """Build, not start. `placement` = (Ray placement group, bundle index per server) runs each server in a
        Ray actor; `sleep_mode` lets the servers free GPU memory while a colocated trainer runs."""
        ...

    def attach(self, urls: list[str]) -> EngineGroup:
        """A group over servers started elsewhere; stopping it leaves them running."""
        ...


class TrainerSpec(Protocol):
    """Everything vime needs to know about one trainer, registered by name in `vime.registry.TRAINERS`."""

    name: str

    def check_args(self, args: Mapping[str, Any]) -> list[str]:
        """One error per `trainer.args` key the backend does not have, naming the keys it does have."""
        ...

    def make(self, cfg: TrainerConfig, *, model_path: str, placement: tuple[Any, list[int]] | None) -> Trainer:
        """Build and start the ranks (`placement` = Ray placement group, bundle index per rank)."""
        ...

    def make_critic(self, cfg: CriticConfig, *, model_path: str, placement: tuple[Any, list[int]] | None) -> Critic:
        """The value model on the same backend: the policy's architecture with a scalar head."""
        ...


class RewardFn(Protocol):
    """Plain or async (a verifier that waits on a sandbox); either is bounded by `rollout.reward_timeout_s`."""

    def __call__(self, sample: Sample) -> float | Awaitable[float]: ...


class GroupFilter(Protocol):
    def __call__(self, group: Group) -> bool:
        """True keeps the group."""
        ...


class RolloutFn(Protocol):
    async def __call__(self, prompts: list[dict[str, Any]], ctx: Any) -> list[Group]:
        """Turn a batch of prompt records into scored groups. `ctx` is a `vime.rollout.RolloutContext`."""
        ...
