"""The RL loop, synchronous mode, top to bottom:

    rollout → advantages → train → push weights in place → (eval) → (checkpoint)

Each step is one named call on a part built in `parts.py`. Resume restores every piece of state (trainer weights
and optimiser, data position, buffer, sampling-seed counters) and re-pushes the weights, so the next step is the
one an uninterrupted run would have taken. The asynchronous loop (`loop_async.py`) is this file's sibling over the
same parts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vime import checkpoint, run_state
from vime.config import Config
from vime.data.batch import sft_samples, training_batch
from vime.data.sft import ConversationSource
from vime.data.source import PromptSource
from vime.parts import Parts
from vime.step_metrics import Timer, rollout_metrics
from vime.types import Group
from vime.update import train_on


def warm_start(run: Parts) -> None:
    """Optional SFT through the same trainer (a random model solves nothing), then publish its weights."""
    cfg = run.cfg
    if cfg.loop.sft_steps:
        source = PromptSource(cfg.data.model_copy(update={"seed": cfg.data.seed + 1}))
        talks = ConversationSource(cfg.loop.sft_path, run.tokenizer, cfg.data.seed + 1) if cfg.loop.sft_path else None
        run.trainer.set_lr(cfg.loop.sft_lr or cfg.trainer.lr)
        run.sync.release_engines()
        for i in run.progress_bar(range(cfg.loop.sft_steps), "sft"):
            n = cfg.loop.sft_batch_size
            batch = talks.next_batch(n) if talks else sft_samples(source, n, run.ctx.encode, run.tokenizer)
            stats = run.trainer.train_step(batch, "sft")
            run.metrics.log(-cfg.loop.sft_steps + i, {"sft/loss": stats["loss"]})
        run.trainer.set_lr(cfg.trainer.lr)
        run.trainer.reset_optimizer()
    run.sync.push("step0")


def open_checkpoint(cfg: Config, resume: str) -> tuple[Path, dict[str, Any]]:
    """Read and check the checkpoint before anything starts (a bad path or a changed recipe fails in a second)."""
    path, state, saved_cfg = checkpoint.load(resume)
    changed = checkpoint.incompatible_changes(saved_cfg, cfg.model_dump(mode="json"))
    if changed:
        raise ValueError(
            f"cannot resume from {path}: the recipe changed in ways that break exact resume:\n  " + "\n  ".join(changed)
        )
    return path, state


def resume_from(run: Parts, path: Path, state: dict[str, Any]) -> int:
    run.trainer.load(str(path / "trainer"))
    if run.critic is not None:
        run.critic.load(str(path / "critic"))
    start = run_state.load_state_dict(run, state)
    run.sync.push(state["version"])
    return start


def eval_due(cfg: Config, step: int) -> bool:
    return bool((cfg.loop.eval_every and (step + 1) % cfg.loop.eval_every == 0) or step + 1 == cfg.loop.num_steps)


def save(run: Parts, step: int, state: Callable[[], dict[str, Any]] | None = None) -> None:
    """`state`: what else the checkpoint holds besides the trainer (default: `run_state`'s)."""
    if run.cfg.loop.save_every and step % run.cfg.loop.save_every == 0:
        checkpoint.save(
            run.out / "checkpoints",
            step,
            run.trainer,
            state() if state else run_state.state_dict(run, step),
            run.cfg.model_dump(mode="json"),
            keep=run.cfg.loop.keep,
            critic=run.critic,
        )


def train(cfg: Config, resume: str | None = None, progress: bool = True) -> dict[str, Any]:
    if cfg.loop.mode != "sync":
        raise ValueError(f"loop.mode={cfg.loop.mode!r} runs in vime.loop_async.train, not the synchronous loop")
    T = cfg.algorithm.temperature or cfg.rollout.temperature
    groups: list[Group] = []
    saved = open_checkpoint(cfg, resume) if resume else None
    with Parts(cfg, progress).build() as run:
        if saved:
            start = resume_from(run, *saved)
        else:
            warm_start(run)
            start = 0
            run.metrics.log(0, {"eval/reward": run.evaluate()})

        bar = run.progress_bar(range(start, cfg.loop.num_steps), cfg.algorithm.name)
        for step in bar:
            timer = Timer()
            with timer("rollout"):
                groups = run.rollout(step)
            metrics = rollout_metrics(groups, timer["time/rollout"]) | run.engine_counters() | run.pool.take_counts()
            metrics |= run.rollout.accounting | run.ctx.faults.take()
            batch = training_batch(
                run.buffer.pop_groups(),
                cfg.algorithm,
                run.sync.version,
                cfg.loop.max_staleness,
                cfg.rollout.max_tokens,
                values_later=run.critic is not None,
            )
            with timer("train"):
                if batch:
                    metrics |= train_on(run, batch, T, step)
            with timer("weight_sync"):
                if batch:
                    metrics |= {f"sync/{k}": v for k, v in run.sync.push(f"step{step + 1}").items()}
            if eval_due(cfg, step):
                metrics["eval/reward"] = run.evaluate()
            metrics |= timer | {"train/samples": float(len(batch))} | run.sync.take_counts()
            run.metrics.log(step + 1, metrics)
            save(run, step + 1)
            bar.set_postfix(
                reward=f"{metrics['rollout/reward']:.2f}",
                len=f"{metrics['rollout/response_len']:.1f}",
                tok_s=f"{metrics['rollout/tokens_per_s']:.0f}",
            )
        return report(run, groups if cfg.loop.num_steps > start else [])


def report(run: Parts, last_groups: list[Group]) -> dict[str, Any]:
    plot = run.metrics.plot(title=f"vime: {run.cfg.algorithm.name} on {run.cfg.model.path}")
    last = [s for g in last_groups for s in g][:3]
    samples = [f"prompt={s.prompt!r} response={s.response!r} reward={s.reward}" for s in last]
    return {"summary": run.metrics.summary(), "plot": str(plot), "history": run.metrics.history, "samples": samples}
