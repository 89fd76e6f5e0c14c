"""The RL loop, synchronous mode, top to bottom:

    rollout → advantages → train → push weights in place → (eval) → (checkpoint)

Each step is one named call on a component built in `assembly.py`. Resume restores every piece of state
(trainer weights and optimiser, data position, buffer, sampling-seed counters) and re-pushes the weights, so the
next step is the one an uninterrupted run would have taken.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from vime.assembly import Assembly
    from vime.config import Config


class LoopConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_steps: int = Field(default=20, ge=0, description="RL steps")
    sft_steps: int = Field(default=0, ge=0, description="supervised warm-start steps before RL")
    sft_batch_size: int = Field(default=64, ge=1)
    sft_lr: float | None = Field(default=None, description="warm-start learning rate (default: trainer.lr)")
    eval_every: int = Field(default=5, ge=0, description="0 = only before and after")
    eval_size: int = Field(default=64, ge=1)
    save_every: int = Field(default=0, ge=0, description="0 = no checkpoints")
    keep: int = Field(default=2, ge=1, description="checkpoints kept")
    max_staleness: int = Field(default=0, ge=0, description="weight versions a batch may lag behind (sync: 0)")


class Timer(dict):
    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self[f"time/{name}"] = time.perf_counter() - t


def consistency(samples: list[Any], trainer_logprobs: list[list[float]]) -> dict[str, float]:
    """Engine vs trainer log-probs of the sampled tokens (loss-mask 1; tool/user tokens were not sampled),
    under the same weights."""
    diffs = [e - t for s, lp in zip(samples, trainer_logprobs) for e, t, m in zip(s.logprobs, lp, s.loss_mask) if m]
    if not diffs:
        return {}
    return {"consistency/mean_abs_diff": sum(abs(d) for d in diffs) / len(diffs),
            "consistency/max_abs_diff": max(abs(d) for d in diffs),
            "consistency/kl": sum(diffs) / len(diffs)}  # E_engine[log p_engine - log p_trainer]


def rollout_metrics(groups: list[Any], seconds: float) -> dict[str, float]:
    samples = [s for g in groups for s in g]
    tokens = sum(len(s.response_ids) for s in samples)
    return {"rollout/reward": sum(s.reward or 0.0 for s in samples) / max(1, len(samples)),
            "rollout/response_len": tokens / max(1, len(samples)), "rollout/tokens_per_s": tokens / seconds}


def warm_start(run: "Assembly") -> None:
    """Optional SFT through the same trainer (a random model solves nothing), then publish its weights."""
    from vime.data.source import PromptSource

    cfg = run.cfg
    if cfg.loop.sft_steps:
        source = PromptSource(cfg.data.model_copy(update={"seed": cfg.data.seed + 1}))
        run.trainer.set_lr(cfg.loop.sft_lr or cfg.trainer.lr)
        run.release_engines()
        for i in run.progress_bar(range(cfg.loop.sft_steps), "sft"):
            stats = run.trainer.train_step(run.sft_samples(source, cfg.loop.sft_batch_size), "sft")
            run.metrics.log(-cfg.loop.sft_steps + i, {"sft/loss": stats["loss"]})
        run.trainer.set_lr(cfg.trainer.lr)
    run.push_weights("step0")


def train(cfg: "Config", resume: str | None = None, progress: bool = True) -> dict[str, Any]:
    from vime import checkpoint
    from vime.assembly import Assembly

    algo, T = cfg.algorithm, cfg.algorithm.temperature or cfg.rollout.temperature
    with Assembly(cfg, progress).build() as run:
        if resume:
            path, state, saved_cfg = checkpoint.load(resume)
            changed = checkpoint.incompatible_changes(saved_cfg, cfg.model_dump(mode="json"))
            if changed:
                raise ValueError(f"cannot resume from {path}: the recipe changed in ways that break exact "
                                 "resume:\n  " + "\n  ".join(changed))
            run.trainer.load(str(path / "trainer"))
            start = run.load_state_dict(state)
            run.push_weights(state["version"])
        else:
            warm_start(run)
            start = 0
            run.metrics.log(0, {"eval/reward": run.evaluate()})

        bar = run.progress_bar(range(start, cfg.loop.num_steps), "grpo")
        for step in bar:
            timer = Timer()
            with timer("rollout"):
                groups = run.rollout(step)
            metrics = rollout_metrics(groups, timer["time/rollout"]) | run.engine_metrics()
            batch = run.training_batch()
            with timer("train"):
                if batch:
                    metrics |= run.release_engines()  # colocated on a GPU: the engines sleep while we train
                    trainer_lp = run.trainer.logprobs(batch, T)
                    metrics |= consistency(batch, trainer_lp)
                    old = trainer_lp if algo.old_logprobs == "recompute" else [s.logprobs for s in batch]
                    stats = run.trainer.train_step(batch, algo.loss, algo.loss_kwargs(), old_logprobs=old,
                                                   temperature=T)
                    metrics |= {f"train/{k}": v for k, v in stats.items()}
            with timer("weight_sync"):
                if batch:
                    metrics |= {f"sync/{k}": v for k, v in run.push_weights(f"step{step + 1}").items()}
            if cfg.loop.eval_every and (step + 1) % cfg.loop.eval_every == 0 or step + 1 == cfg.loop.num_steps:
                metrics["eval/reward"] = run.evaluate()
            metrics |= timer | {"train/samples": float(len(batch))}
            run.metrics.log(step + 1, metrics)
            if cfg.loop.save_every and (step + 1) % cfg.loop.save_every == 0:
                checkpoint.save(run.out / "checkpoints", step + 1, run.trainer, run.state_dict(step + 1),
                                cfg.model_dump(mode="json"), keep=cfg.loop.keep)
            bar.set_postfix(reward=f"{metrics['rollout/reward']:.2f}", len=f"{metrics['rollout/response_len']:.1f}",
                            tok_s=f"{metrics['rollout/tokens_per_s']:.0f}")
        plot = run.metrics.plot(title=f"vime: {cfg.algorithm.name} on {cfg.model.path}")
        summary = run.metrics.summary()
        last = [s for g in groups for s in g][:3] if cfg.loop.num_steps > start else []
        samples = [f"prompt={s.prompt!r} response={s.response!r} reward={s.reward}" for s in last]
        return {"summary": summary, "plot": str(plot), "history": run.metrics.history, "samples": samples}
