"""The RL loop, asynchronous mode: the parts of `loop.py`, in two threads.

    rollout thread:  prompts → rollout → filters → ready buffer              (the engines never wait for the trainer)
    trainer thread:  take a batch → bound its staleness → train → push weights in place → (eval) → (checkpoint)

A push pauses the engines no longer than the push: with `weights.pause_mode: keep` the in-flight generations
freeze and go on under the new weights, and their tokens carry both versions. The rollout thread runs at most
`loop.max_staleness` batches ahead of the trainer (further ahead, its groups would only go stale). Before a batch
trains, every group with a sampled token more than `max_staleness` versions behind the trainer is dropped or its
prompt sampled again (`loop.stale_policy`); `training_batch` then refuses any such token, whatever happened before.

Nothing is lost on a kill: a checkpoint holds the ready groups and the prompts in flight (drawn, not yet landed),
taken together under one lock; a resumed run re-issues those prompts before drawing new ones.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from vime import run_state
from vime.config import Config
from vime.data.batch import training_batch
from vime.data.buffer import DataBuffer
from vime.data.source import PromptSource
from vime.loop import eval_due, open_checkpoint, report, resume_from, save, warm_start
from vime.parts import Parts
from vime.staleness import mask_older_versions, split_stale, staleness_metrics, version_number
from vime.step_metrics import Timer, rollout_metrics
from vime.types import Group, Sample, write_jsonl
from vime.update import train_on


class Feed:
    """The rollout thread's prompts: re-issued ones (stale groups, a resumed run's in-flight prompts) before new
    ones. It knows which prompts are in flight, so a checkpoint can hold them."""

    def __init__(self, source: PromptSource, ready: DataBuffer):
        self.source, self.ready = source, ready
        self.lock = threading.Lock()
        self.reissue: list[dict[str, Any]] = []
        self.inflight: list[dict[str, Any]] = []

    def draw(self, n: int) -> list[dict[str, Any]]:
        with self.lock:
            out, self.reissue = self.reissue[:n], self.reissue[n:]
            out += self.source.next_batch(n - len(out))
            self.inflight += out
            return out

    def land(self, staging: DataBuffer) -> None:
        """The step's groups become ready and its prompts stop being in flight, at once."""
        with self.lock:
            self.ready.add(staging.pop_groups())
            self.inflight = []

    def regenerate(self, groups: list[Group]) -> None:
        rows: list[Any] = [s.metadata.get("data_index") for g in groups for s in g]
        if None in rows:
            raise RuntimeError(
                "loop.stale_policy=regenerate: a stale group's samples name no data row (metadata['data_index']); "
                "a rollout function that drops groups must stamp it, or use loop.stale_policy=drop"
            )
        with self.lock:
            self.reissue += [self.source.records[int(i)] for i in sorted(set(rows))]

    def state_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "source": self.source.state_dict(),
                "buffer": self.ready.state_dict(),
                "reissue": [r["index"] for r in self.inflight + self.reissue],
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ready.load_state_dict(state["buffer"])
        self.reissue = [self.source.records[i] for i in state.get("reissue", [])]


class Producer(threading.Thread):
    """Rollout steps, one after another, while the ready buffer holds fewer than `ahead` batches."""

    def __init__(self, run: Parts, feed: Feed, ahead: int, first_step: int):
        super().__init__(name="vime-rollout", daemon=True)
        self.run_, self.feed, self.ahead, self.step = run, feed, ahead, first_step
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.reports: list[dict[str, float]] = []  # one per rollout step, taken by the trainer's next step

    def run(self) -> None:
        run, ready = self.run_, self.feed.ready
        cap = self.ahead * run.cfg.rollout.batch_size
        try:
            while not self.stopping.is_set():
                with ready.changed:
                    if len(ready) >= cap:
                        ready.changed.wait(1.0)
                        continue
                t = time.perf_counter()
                groups = run.rollout(self.step)
                m = rollout_metrics(groups, time.perf_counter() - t) | {"time/rollout": time.perf_counter() - t}
                m |= run.rollout.accounting | run.ctx.faults.take() | run.pool.take_counts() | run.engine_counters()
                self.feed.land(run.buffer)
                with self.lock:
                    self.reports.append(m)
                self.step += 1
        except BaseException as e:  # noqa: BLE001 - handed to the trainer's thread, which raises it
            self.error = e
            with ready.changed:
                ready.changed.notify_all()

    def take_reports(self) -> dict[str, float]:
        """The rollout steps since the last call: counts summed, the rest averaged."""
        with self.lock:
            reports, self.reports = self.reports, []
        keys = {k for r in reports for k in r}
        summed = ("samples/", "faults/", "gateway/", "time/rollout", "engines/kv/")
        return {
            k: sum(r.get(k, 0.0) for r in reports) / (1 if k.startswith(summed) else len(reports)) for k in keys
        } | {"rollout/steps": float(len(reports))}


def take_batch(run: Parts, feed: Feed, producer: Producer) -> tuple[list[Group], dict[str, float]]:
    """`rollout.batch_size` groups within the staleness bound, and what it took to get them."""
    cfg = run.cfg.loop
    want, trainer_version = run.cfg.rollout.batch_size, version_number(run.sync.version)
    fresh: list[Group] = []
    taken = 0
    counts = {"stale/dropped_groups": 0.0, "stale/regenerated_groups": 0.0, "stale/masked_tokens": 0.0}
    while (missing := want - len(fresh)) > 0:
        feed.ready.wait_for(
            lambda n=missing: len(feed.ready) >= n or producer.error is not None,  # type: ignore[misc]
            cfg.rollout_timeout_s,
            f"{missing} rollout groups (loop.rollout_timeout_s)",
        )
        if len(feed.ready) < missing and producer.error is not None:  # what it landed before failing is used
            raise RuntimeError(f"the rollout thread failed: {producer.error}") from producer.error
        groups = feed.ready.pop_groups(missing)
        if cfg.mixed_versions == "mask_old":
            counts["stale/masked_tokens"] += sum(mask_older_versions(s) for g in groups for s in g)
        ok, stale = split_stale(groups, trainer_version, cfg.max_staleness)
        fresh += ok
        if stale and cfg.stale_policy == "regenerate":
            feed.regenerate(stale)
        counts[f"stale/{'regenerated' if cfg.stale_policy == 'regenerate' else 'dropped'}_groups"] += len(stale)
        taken += len(groups)
    counts["stale/frac_groups"] = (taken - len(fresh)) / taken
    return fresh, counts


def train(cfg: Config, resume: str | None = None, progress: bool = True) -> dict[str, Any]:
    T = cfg.algorithm.temperature or cfg.rollout.temperature
    saved = open_checkpoint(cfg, resume) if resume else None
    with Parts(cfg, progress).build() as run:
        feed = Feed(run.source, DataBuffer())
        run.rollout.draw = feed.draw
        if saved:
            start = resume_from(run, *saved)
            run.buffer.pop_groups()  # the checkpoint's groups are the ready ones, not the rollout's staging
            feed.load_state_dict(saved[1])
        else:
            warm_start(run)
            start = 0
            run.metrics.log(0, {"eval/reward": run.evaluate()})
        producer = Producer(run, feed, cfg.loop.max_staleness, start)
        producer.start()
        try:
            result = steps(run, feed, producer, start, T)
        except BaseException:
            producer.stopping.set()  # its rollout fails once the engines stop; the pool restarts nothing then
            producer.join(timeout=30)
            raise
        producer.stopping.set()
        producer.join(timeout=cfg.loop.rollout_timeout_s)  # the last rollout step ends before the engines stop
        return result


def steps(run: Parts, feed: Feed, producer: Producer, start: int, T: float) -> dict[str, Any]:
    cfg = run.cfg
    groups: list[Group] = []
    bar = run.progress_bar(range(start, cfg.loop.num_steps), f"{cfg.algorithm.name} (async)")
    for step in bar:
        timer, t0 = Timer(), time.perf_counter()
        with timer("wait_for_batch"):
            groups, metrics = take_batch(run, feed, producer)
        if step + 1 == cfg.loop.num_steps:
            producer.stopping.set()  # the last batch is in hand: no rollout is wasted past the end
        version = version_number(run.sync.version)
        batch = training_batch(
            groups, cfg.algorithm, run.sync.version, cfg.loop.max_staleness, cfg.rollout.max_tokens,
            values_later=run.critic is not None,
        )  # fmt: skip
        metrics |= staleness_metrics(batch, version) | producer.take_reports()
        for s in batch:
            s.metadata["trained_at"] = version
        if cfg.run.save_samples:
            write_trained(run, batch, step)
        with timer("train"):
            metrics |= train_on(run, batch, T, step)
        with timer("weight_sync"):
            metrics |= {f"sync/{k}": v for k, v in run.sync.push(f"step{step + 1}").items()}
        if eval_due(cfg, step):
            metrics["eval/reward"] = run.evaluate()
        metrics |= timer | {"train/samples": float(len(batch)), "time/step": time.perf_counter() - t0}
        run.metrics.log(step + 1, metrics | run.sync.take_counts())
        save(run, step + 1, lambda s=step + 1: run_state.state_dict(run, s) | feed.state_dict())  # type: ignore[misc]
        bar.set_postfix(reward=f"{metrics.get('rollout/reward', float('nan')):.2f}")
    return report(run, groups if cfg.loop.num_steps > start else [])


def write_trained(run: Parts, batch: list[Sample], step: int) -> None:
    """The samples each step learned from, with their per-token versions and `metadata.trained_at`: what a
    reader checks the staleness bound against."""
    d = run.out / "samples"
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(batch, d / f"trained_{step + 1:06d}.jsonl")
