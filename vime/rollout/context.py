"""What a rollout function gets to work with: the engines, the tokenizer, sampling and scoring."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vime.data.source import DataConfig
from vime.protocols import EnginePool
from vime.rewards import get_reward_fn
from vime.rollout.config import RolloutConfig
from vime.rollout.faults import Faults
from vime.types import Sample, SamplingParams


def in_daemon_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """`fn(*args)` in a thread of its own that nothing joins. `asyncio.to_thread` uses the loop's executor, which
    `asyncio.run` waits for when the step ends: a verifier hung past its timeout would still hang the run."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():  # a timed-out wait has cancelled it
            fut.set_result(value) if ok else fut.set_exception(value)

    def work() -> None:
        try:
            ok, value = True, fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine as is
            ok, value = False, e
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the step's loop is gone: nobody waits for this any more
            pass

    threading.Thread(target=work, daemon=True, name="vime-reward").start()
    return fut


@dataclass
class RolloutContext:
    engines: EnginePool
    tokenizer: Any  # a transformers tokenizer
    params: SamplingParams
    reward_fn: Callable[[Sample], Any]  # a float, or an awaitable of one
    apply_chat_template: bool = True
    system_prompt: str | None = None
    step: int = 0
    seed_base: int | None = 0  # None: unseeded sampling
    counters: dict[str, int] = field(default_factory=lambda: {"prompts": 0})
    gateway: Any = None  # the running OpenAI gateway (agent rollouts)
    agent: str | None = None  # the agent's import path (agent rollouts)
    on_history_rewrite: str = "train"  # what agent rollouts do with a branch whose history the agent rewrote
    context_limit: int | None = None  # prompt + max_tokens the engine accepts (None: unknown)
    data_source: str = "the prompt data"  # the file prompt records come from, for messages that name a row
    faults: Faults = field(default_factory=Faults)
    reward_timeout_s: float = 60.0

    async def score(self, sample: Sample, what: str) -> bool:
        """Set the sample's reward; False (and counted) when the reward function raised or ran past
        `rollout.reward_timeout_s`. It runs off the event loop (a slow verifier must not stall generation); an
        async reward function is awaited. A timed-out thread cannot be stopped, only abandoned (a daemon thread:
        neither the step's event loop nor the process waits for it); the bound on failures bounds them too."""
        fn = self.reward_fn
        call = fn(sample) if inspect.iscoroutinefunction(fn) else in_daemon_thread(fn, sample)
        try:
            sample.reward = float(await asyncio.wait_for(call, self.reward_timeout_s))
        except TimeoutError:
            self.faults.record(
                "reward_timeouts", f"reward of {what} took longer than rollout.reward_timeout_s={self.reward_timeout_s}"
            )
            return False
        except Exception as e:  # noqa: BLE001 - a user's reward may raise anything; recorded with its traceback
            self.faults.record("reward_errors", f"reward of {what}", e)
            return False
        return True

    def fits(self, prompt_ids: list[int], record: dict[str, Any]) -> bool:
        """False (and counted, naming the data row) when prompt + max_tokens exceed the engine's context."""
        limit, need = self.context_limit, len(prompt_ids) + self.params.max_tokens
        if limit is None or need <= limit:
            return True
        row = record.get("index")
        self.faults.record(
            "prompts_too_long",
            f"data row {row} of {self.data_source}: {len(prompt_ids)} prompt tokens + "
            f"max_tokens {self.params.max_tokens} exceed the engine's context of {limit} tokens",
        )
        return False

    def encode(self, prompt: Any) -> list[int]:
        """Prompt text (or a message list) → token ids, through the model's chat template by default."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return list(prompt)
        if not self.apply_chat_template:
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        if self.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def next_seed(self) -> int | None:
        """A distinct seed per prompt draw (children get seed+k inside the engine), so a run is reproducible
        and a resumed run draws the same tokens."""
        k = self.counters["prompts"]
        self.counters["prompts"] += 1
        return None if self.seed_base is None else self.seed_base + k * max(1, self.params.n)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def make_context(
    r: RolloutConfig,
    data: DataConfig,
    engines: EnginePool,
    tokenizer: Any,
    context_limit: int | None = None,
    routed_experts: bool = False,
) -> RolloutContext:
    params = SamplingParams(
        n=r.n_samples,
        max_tokens=r.max_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        stop=list(r.stop),
        extra=dict(r.sampling_extra),
        routed_experts=routed_experts,
    )
    return RolloutContext(
        engines=engines,
        tokenizer=tokenizer,
        params=params,
        reward_fn=get_reward_fn(r.reward),
        apply_chat_template=data.apply_chat_template,
        system_prompt=data.system_prompt,
        seed_base=r.seed,
        agent=r.agent,
        on_history_rewrite=r.on_history_rewrite,
        context_limit=context_limit,
        faults=Faults(bound=r.max_failures),
        reward_timeout_s=r.reward_timeout_s,
        data_source=data.path,
    )
