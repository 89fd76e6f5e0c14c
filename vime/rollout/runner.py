"""`vime rollout`: engines up, prompts through the rollout function, groups into the buffer, samples to JSONL."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from vime.config import Config
from vime.data.buffer import DataBuffer, drop_uniform_reward
from vime.data.source import PromptSource
from vime.engine import make_engine_group
from vime.registry import load_callable
from vime.rewards import get_reward_fn
from vime.rollout.context import RolloutContext
from vime.types import Group, SamplingParams, write_jsonl

BUILTIN_FILTERS: dict[str, Callable[[Group], bool]] = {"drop_uniform_reward": drop_uniform_reward}


def group_filters(names: list[str]) -> list[Callable[[Group], bool]]:
    return [BUILTIN_FILTERS[n] if n in BUILTIN_FILTERS else load_callable(n, 1, what="group filter "
                                                                          "(rollout.group_filters)")
            for n in names]


def load_tokenizer(cfg: Config) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)


def make_context(cfg: Config, engines: Any, tokenizer: Any) -> RolloutContext:
    r = cfg.rollout
    params = SamplingParams(n=r.n_samples, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, stop=list(r.stop), extra=dict(r.sampling_extra))
    return RolloutContext(engines=engines, tokenizer=tokenizer, params=params, reward_fn=get_reward_fn(r.reward),
                          apply_chat_template=cfg.data.apply_chat_template, system_prompt=cfg.data.system_prompt,
                          seed_base=r.seed, agent=r.agent)


def rollout_fn(cfg: Config) -> Callable[..., Any]:
    return load_callable(cfg.rollout.function, 2, what="rollout function (rollout.function)")


def run_rollout(cfg: Config, steps: int, out: str | Path | None = None, progress: bool = True,
                engines: Any = None) -> dict[str, float]:
    """Run `steps` rollout steps and return a throughput summary; samples go to `out` as JSONL.
    `engines` reuses a running engine group (tests, notebooks); otherwise the recipe's group is started and
    stopped here."""
    if engines is None:
        with make_engine_group(cfg.engine, cfg.model.path, str(Path(cfg.run.out_dir) / "logs")) as engines:
            return run_rollout(cfg, steps, out, progress, engines)
    fn = rollout_fn(cfg)
    source = PromptSource(cfg.data)
    buffer = DataBuffer(group_filters(cfg.rollout.group_filters))
    tokenizer = load_tokenizer(cfg)
    samples, tokens, rewards = [], 0, []
    ctx = make_context(cfg, engines, tokenizer)
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="rollout", unit="step", disable=not progress)
    for step in bar:
        ctx.step = step
        groups = asyncio.run(fn(source.next_batch(cfg.rollout.batch_size), ctx))
        buffer.add(groups)
        for g in groups:
            samples += g
            tokens += sum(len(s.response_ids) for s in g)
            rewards += [s.reward or 0.0 for s in g]
        bar.set_postfix(reward=f"{sum(rewards) / max(1, len(rewards)):.3f}",
                        tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
    elapsed = time.perf_counter() - t0
    if out:
        write_jsonl(samples, out)
    return {"steps": steps, "samples": len(samples), "response_tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed, "samples_per_s": len(samples) / elapsed,
            "mean_reward": sum(rewards) / max(1, len(rewards)), "groups_kept": len(buffer),
            "groups_dropped": buffer.stats["groups_dropped"]}
