"""`vime rollout`: engines up, prompts through the rollout step, groups into the buffer, samples to JSONL."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from vime.config import Config, gateway_config
from vime.data.buffer import DataBuffer
from vime.data.source import PromptSource
from vime.protocols import EngineGroup
from vime.rollout.context import RolloutContext, load_tokenizer, make_context
from vime.rollout.step import RolloutStep, make_buffer
from vime.specs import engine_spec, make_engine_group
from vime.supervise import SupervisedPool
from vime.types import Sample, write_jsonl


def run_rollout(
    cfg: Config, steps: int, out: str | Path | None = None, progress: bool = True, engines: EngineGroup | None = None
) -> dict[str, float]:
    """Run `steps` rollout steps and return a throughput summary; samples go to `out` as JSONL.
    `engines` reuses a running engine group (tests, notebooks); otherwise the recipe's group is started and
    stopped here."""
    if engines is None:
        group = make_engine_group(cfg.engine, cfg.model.path, str(Path(cfg.run.out_dir) / "logs"))
        try:
            return run_rollout(cfg, steps, out, progress, group.start())
        finally:
            group.stop()
    buffer = make_buffer(cfg.rollout.group_filters)
    pool = SupervisedPool(  # engines hold the model directory's weights: nothing to re-sync
        engines, resync=lambda: None, max_restarts=cfg.loop.max_engine_restarts, probe=cfg.loop.engine_probe
    )
    limit = engine_spec(cfg.engine.name).context_limit(cfg.engine)
    ctx = make_context(cfg.rollout, cfg.data, pool, load_tokenizer(cfg.model.tokenizer or cfg.model.path), limit)
    if cfg.rollout.agent:  # agents reach the engines through the OpenAI gateway, which records their tokens
        from vime.gateway.server import Gateway

        with Gateway(pool, ctx.tokenizer, gateway_config(cfg)) as ctx.gateway:
            return rollout_steps(cfg, ctx, buffer, steps, out, progress)
    return rollout_steps(cfg, ctx, buffer, steps, out, progress)


def rollout_steps(
    cfg: Config, ctx: RolloutContext, buffer: DataBuffer, steps: int, out: str | Path | None, progress: bool
) -> dict[str, float]:
    r = cfg.rollout
    rollout = RolloutStep(
        r.function, PromptSource(cfg.data), buffer, ctx, r.batch_size, None, r.dynamic_sampling, r.max_failure_rate
    )
    samples: list[Sample] = []
    tokens, rewards = 0, []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="rollout", unit="step", disable=not progress)
    for step in bar:
        for g in rollout(step):
            samples += g
            tokens += sum(len(s.response_ids) for s in g)
            rewards += [s.reward or 0.0 for s in g]
        bar.set_postfix(
            reward=f"{sum(rewards) / max(1, len(rewards)):.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}"
        )
    elapsed = time.perf_counter() - t0
    if out:
        write_jsonl(samples, out)
    return {
        "steps": steps,
        "samples": len(samples),
        "response_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "samples_per_s": len(samples) / elapsed,
        "mean_reward": sum(rewards) / max(1, len(rewards)),
        "groups_kept": len(buffer),
        "groups_dropped": buffer.stats["groups_dropped"],
        "failed": ctx.faults.total,
        **rollout.accounting,  # the last step's
        **ctx.faults.take(),
    }
