"""The running parts of a training job, built from the recipe in one order and torn down together.

`loop.py` reads as the algorithm; this file only starts things (Ray placement, engines, trainer, weight channel,
gateway, metrics) and registers how each one stops, so a failure anywhere stops what already runs.
"""

from __future__ import annotations

import contextlib
import logging
import random
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from vime.config import Config, gateway_config
from vime.data.source import PromptSource
from vime.evaluate import Evaluator
from vime.metrics import MetricsLogger
from vime.placement import ensure_ray, placement_group, plan, remove_placement_group
from vime.preflight import preflight
from vime.protocols import Critic
from vime.rollout import ROLLOUTS
from vime.rollout.context import load_tokenizer, make_context
from vime.rollout.step import RolloutStep, make_buffer
from vime.specs import engine_spec, make_critic, make_engine_group, make_trainer
from vime.step_metrics import EngineCounters
from vime.supervise import SupervisedPool
from vime.sync import WeightSync

log = logging.getLogger(__name__)
# on the way out, how long to wait for ranks still starting before leaving them to their placement group's removal
RANKS_START_WAIT_S = 120.0


class Parts(contextlib.ExitStack):
    def __init__(self, cfg: Config, progress: bool = True):
        super().__init__()
        self.cfg = cfg
        self.out = Path(cfg.run.out_dir)
        self.progress = progress
        self.nonfinite: list[str] = []  # steps skipped for a NaN/inf loss or gradient, with their loss
        self.critic: Critic | None = None

    def build(self) -> Parts:
        """Start every part; if any part fails to start, stop the ones already running (the caller's `with`
        never sees a half-built run, so it could not clean up)."""
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        cfg = self.cfg
        random.seed(cfg.run.seed)
        self.source = PromptSource(cfg.data)
        preflight(cfg, self.source)  # before Ray, engines and trainer: a typo costs a second
        ensure_ray(cfg.ray)
        self.buffer = make_buffer(cfg.rollout.group_filters)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
        t, e = cfg.trainer, cfg.engine
        colocate = cfg.placement.colocate
        bundles, trainer_idx, engine_idx = plan(
            colocate,
            t.world_size,
            {"CPU": t.cpus_per_rank, "GPU": t.gpus_per_rank},
            e.num_servers,
            {"CPU": e.cpus_per_engine, "GPU": e.gpus_per_engine},
        )
        # Colocated on GPUs: each bundle holds one GPU that a trainer rank and an engine share (half each to
        # Ray), and the engines sleep while the trainer runs.
        sleeps = colocate and t.gpus_per_rank > 0 and e.gpus_per_engine > 0
        if sleeps:
            t = t.model_copy(update={"gpus_per_rank": t.gpus_per_rank / 2})
            e = e.model_copy(update={"gpus_per_engine": e.gpus_per_engine / 2})
        c = cfg.critic
        critic_idx = trainer_idx
        if c is not None and c.colocate:  # the critic shares the trainer's bundles: half of each share each
            share = {"cpus_per_rank": t.cpus_per_rank / 2, "gpus_per_rank": t.gpus_per_rank / 2}
            t, c = t.model_copy(update=share), c.model_copy(update=share)
        elif c is not None:  # bundles of its own
            critic_idx = list(range(len(bundles), len(bundles) + c.world_size))
            bundles += [{"CPU": c.cpus_per_rank, "GPU": c.gpus_per_rank}] * c.world_size
        pg = placement_group(bundles, name=f"vime-{self.out.name}-{uuid.uuid4().hex[:6]}")
        self.callback(remove_placement_group, pg)
        self.engines = make_engine_group(
            e,
            cfg.model.path,
            str(self.out / "logs"),
            weights_backend=cfg.weights.backend,
            placement=(pg, engine_idx),
            sleep_mode=sleeps,
        )
        self.callback(self.engines.stop)
        # the ranks start while the engines do: each takes tens of seconds (imports, weights) and neither needs
        # the other before the weight channel connects
        pool = ThreadPoolExecutor(1, thread_name_prefix="vime-ranks")
        ranks = pool.submit(self._start_ranks, t, c, (pg, trainer_idx), (pg, critic_idx))
        pool.shutdown(wait=False)
        self.callback(self._stop_ranks, ranks)
        self.engines.start()
        ranks.result()
        # engines stop before the ranks (stop is idempotent): a rank interrupted mid-push (SIGTERM, an error) is
        # waiting on the engines, and their going away ends its wait instead of the rank's shutdown timeout
        self.callback(self.engines.stop)
        self.sync = WeightSync(self.trainer, self.engines, engine_spec(e.name).weight_channel, cfg.weights, sleeps)
        self.sync.connect()
        self.pool = SupervisedPool(
            self.engines, self.sync.resync, cfg.loop.max_engine_restarts, probe=cfg.loop.engine_probe
        )
        self.callback(self.pool.close)  # before the engines stop: their going away is no fault to repair
        limit = engine_spec(e.name).context_limit(cfg.engine)
        self.ctx = make_context(
            cfg.rollout, cfg.data, self.pool, self.tokenizer, limit, routed_experts=cfg.algorithm.routing_replay
        )
        if cfg.rollout.agent:  # agents reach the engines through the OpenAI gateway, which records their tokens
            from vime.gateway.server import Gateway

            self.ctx.gateway = Gateway(self.pool, self.tokenizer, gateway_config(cfg)).start()
            self.callback(self.ctx.gateway.stop)
        samples_dir = self.out / "samples" if cfg.run.save_samples else None
        r = cfg.rollout
        self.rollout = RolloutStep(
            r.function,
            self.source,
            self.buffer,
            self.ctx,
            r.batch_size,
            samples_dir,
            r.dynamic_sampling,
            r.max_failure_rate,
        )
        self.evaluate = Evaluator(cfg.data, cfg.loop.eval_size, ROLLOUTS.get(cfg.rollout.function), self.ctx)
        self.engine_counters = EngineCounters(self.engines)
        self.metrics = MetricsLogger(self.out, wandb_project=cfg.run.wandb_project)
        self.callback(self.metrics.close)

    def _start_ranks(self, t: Any, c: Any, trainer_at: tuple[Any, list[int]], critic_at: tuple[Any, list[int]]) -> None:
        self.trainer = make_trainer(t, self.cfg.model.path, placement=trainer_at)
        if c is not None:
            self.critic = make_critic(c, self.cfg.model.path, placement=critic_at)

    def _stop_ranks(self, starting: Future[None]) -> None:
        """On the way out, also while the ranks are still starting: what started is shut down."""
        if not wait([starting], timeout=RANKS_START_WAIT_S).done:  # its own error is raised where the start waited
            log.warning("trainer ranks still starting after %.0f s: left to their placement group", RANKS_START_WAIT_S)
        for part in (self.critic, getattr(self, "trainer", None)):
            if part is not None:
                part.shutdown()

    def progress_bar(self, it: Any, desc: str) -> Any:
        from tqdm import tqdm

        return tqdm(it, desc=desc, unit="step", disable=not self.progress, dynamic_ncols=True)
