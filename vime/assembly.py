"""The running parts of a training job, built from the recipe and torn down together.

`loop.py` reads as the algorithm; this file is the plumbing it calls: building engines and trainer, moving
weights, evaluating, and the state that makes a checkpoint resumable.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import uuid
from pathlib import Path
from typing import Any

from vime.algorithms.recipe import assign_advantages
from vime.config import Config
from vime.data.buffer import DataBuffer
from vime.data.source import DataConfig, PromptSource
from vime.engine import make_engine_group
from vime.gateway.server import Gateway, gateway_config
from vime.metrics import MetricsLogger
from vime.placement import ensure_ray, placement_group, plan, remove_placement_group
from vime.rollout.runner import group_filters, load_tokenizer, make_context, rollout_fn
from vime.trainer import make_trainer
from vime.types import Group, Sample, write_jsonl
from vime.weights import WeightPushError

CHANNELS = {"vllm": "engines.vllm.weight_channel:VLLMWeightChannel"}


def gpu_free_gb() -> float:
    """Free memory of the first visible GPU as the driver sees it (all processes), in GB."""
    import os
    import subprocess

    gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", gpu],
                         capture_output=True, text=True, timeout=30).stdout
    return float(out.split()[0]) / 1024 if out.strip() else float("nan")


class Assembly(contextlib.ExitStack):
    def __init__(self, cfg: Config, progress: bool = True):
        super().__init__()
        self.cfg = cfg
        self.out = Path(cfg.run.out_dir)
        self.progress = progress
        self.version = "default"
        self.sleeps = self.asleep = False

    def build(self) -> "Assembly":
        """Start every part; if any part fails to start, stop the ones already running (the caller's `with`
        never sees a half-built assembly, so it could not clean up)."""
        try:
            return self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> "Assembly":
        cfg = self.cfg
        random.seed(cfg.run.seed)
        ensure_ray(cfg.ray)
        self.source = PromptSource(cfg.data)
        self.buffer = DataBuffer(group_filters(cfg.rollout.group_filters))
        self.tokenizer = load_tokenizer(cfg)
        t, e = cfg.trainer, cfg.engine
        colocate = cfg.placement.colocate
        bundles, trainer_idx, engine_idx = plan(colocate, t.world_size,
                                                {"CPU": t.cpus_per_rank, "GPU": t.gpus_per_rank}, e.num_servers,
                                                {"CPU": e.cpus_per_engine, "GPU": e.gpus_per_engine})
        # Colocated on GPUs: each bundle holds one GPU that a trainer rank and an engine share (half each to
        # Ray), and the engines sleep while the trainer runs.
        self.sleeps = colocate and t.gpus_per_rank > 0 and e.gpus_per_engine > 0
        if self.sleeps:
            t = t.model_copy(update={"gpus_per_rank": t.gpus_per_rank / 2})
            e = e.model_copy(update={"gpus_per_engine": e.gpus_per_engine / 2})
        pg = placement_group(bundles, name=f"vime-{self.out.name}-{uuid.uuid4().hex[:6]}")
        self.callback(remove_placement_group, pg)
        self.engines = make_engine_group(e, cfg.model.path, str(self.out / "logs"), weights_backend=cfg.weights.backend,
                                         placement=(pg, engine_idx), sleep_mode=self.sleeps)
        self.callback(self.engines.stop)
        self.engines.start()
        self.trainer = make_trainer(t, cfg.model.path, placement=(pg, trainer_idx))
        self.callback(self.trainer.shutdown)
        self.connect_weights()
        self.ctx = make_context(cfg, self.engines, self.tokenizer)
        if cfg.rollout.agent:  # agents reach the engines through the OpenAI gateway, which records their tokens
            self.ctx.gateway = Gateway(self.engines, self.tokenizer, gateway_config(cfg)).start()
            self.callback(self.ctx.gateway.stop)
        self.rollout_fn = rollout_fn(cfg)
        self.metrics = MetricsLogger(self.out, wandb_project=cfg.run.wandb_project)
        self.callback(self.metrics.close)
        return self

    def progress_bar(self, it: Any, desc: str) -> Any:
        from tqdm import tqdm

        return tqdm(it, desc=desc, unit="step", disable=not self.progress, dynamic_ncols=True)

    # ---- weights ---------------------------------------------------------------------------------------
    def connect_weights(self) -> None:
        self.trainer.connect_weights(CHANNELS[self.cfg.engine.name], self.cfg.weights.model_dump(),
                                     self.engines.urls())

    def release_engines(self) -> dict[str, float]:
        """Colocated on GPUs: the engines give their memory to the trainer until the next push."""
        if not self.sleeps or self.asleep:
            return {}
        before = gpu_free_gb()
        self.engines.sleep(level=1)
        self.asleep = True
        return {"memory/engine_sleep_freed_gb": gpu_free_gb() - before}

    def push_weights(self, version: str) -> dict[str, float]:
        """Push the trainer's weights to every engine (waking sleeping ones: weights first, KV cache after the
        push); a failed push restarts the engines and retries once."""
        mem: dict[str, float] = {}
        if self.asleep:
            self.trainer.release_memory()  # the trainer's cached activations go back before the engine wakes
            before = gpu_free_gb()
            self.engines.wake_up(["weights"])
        try:
            stats = self._push(version)
        finally:
            if self.asleep:
                self.engines.wake_up(["kv_cache"])
                self.asleep = False
                mem = {"memory/engine_wake_used_gb": before - gpu_free_gb()}
        return stats | mem

    def _push(self, version: str) -> dict[str, float]:
        try:
            stats = self.trainer.push_weights(version)
        except Exception as e:  # noqa: BLE001 - Ray wraps the WeightPushError
            if not isinstance(e, WeightPushError) and "WeightPushError" not in repr(e):
                raise
            for i in range(len(self.engines.servers)):
                self.engines.restart(i)
            self.connect_weights()
            stats = self.trainer.push_weights(version)
        self.version = version
        for e in self.engines.engines:
            if e.client.local_version is not None:  # vLLM lines without /weight_info
                e.client.local_version = version
        return stats

    # ---- data ------------------------------------------------------------------------------------------
    def rollout(self, step: int) -> list[Group]:
        self.ctx.step = step
        groups = asyncio.run(self.rollout_fn(self.source.next_batch(self.cfg.rollout.batch_size), self.ctx))
        if self.cfg.run.save_samples:
            (self.out / "samples").mkdir(exist_ok=True)
            write_jsonl([s for g in groups for s in g], self.out / "samples" / f"step_{step + 1:06d}.jsonl")
        self.buffer.add(groups)
        return groups

    def engine_metrics(self) -> dict[str, float]:
        """Per-step engine counters (P/D KV tokens transferred vs computed, TTFT), as deltas since the last call."""
        if not hasattr(self.engines, "step_metrics"):
            return {}
        now = self.engines.step_metrics()
        last, self._engine_counters = getattr(self, "_engine_counters", {}), now
        out = {k: v for k, v in now.items() if k.startswith("engines/")}
        for k in now:
            if k.startswith(("kv/", "ttft/")):
                out[f"engines/{k}"] = now[k] - last.get(k, 0.0)
        n = out.pop("engines/ttft/count", 0.0)
        total = out.pop("engines/ttft/sum", 0.0)
        if n:
            out["engines/ttft_mean_s"] = total / n
        return out

    def training_batch(self) -> list[Sample]:
        samples = assign_advantages(self.buffer.pop_groups(), self.cfg.algorithm)
        sampled = (v for s in samples for v, m in zip(s.weight_versions, s.loss_mask) if m)  # not user/tool tokens
        stale = set(sampled) - {self.version}
        if stale and self.cfg.loop.max_staleness == 0:
            raise RuntimeError(f"batch holds tokens from weight versions {sorted(stale)} but the trainer is at "
                               f"{self.version!r}; allow it with loop.max_staleness")
        return samples

    def sft_samples(self, source: PromptSource, n: int) -> list[Sample]:
        """Prompt + reference answer + EOS, for the supervised warm start."""
        eos = self.tokenizer.eos_token_id
        out = []
        for rec in source.next_batch(n):
            resp = self.tokenizer.encode(str(rec["label"]), add_special_tokens=False) + [eos]
            out.append(Sample(prompt_ids=self.ctx.encode(rec["prompt"]), response_ids=resp,
                              logprobs=[0.0] * len(resp)))
        return out

    def evaluate(self) -> float:
        """Greedy accuracy on the held-out set (its own context, so training seeds are untouched)."""
        cfg = self.cfg
        if not cfg.data.eval_path:
            return float("nan")
        if getattr(self, "eval_records", None) is None:  # read the eval file once, not at every eval
            self.eval_records = PromptSource(DataConfig(**{**cfg.data.model_dump(), "path": cfg.data.eval_path,
                                                           "shuffle": False})).records[: cfg.loop.eval_size]
        records = self.eval_records
        ctx = dataclasses.replace(self.ctx, params=dataclasses.replace(self.ctx.params, n=1, temperature=0.0),
                                  seed_base=None, counters={"prompts": 0})
        groups = asyncio.run(self.rollout_fn(records, ctx))
        rewards = [s.reward or 0.0 for g in groups for s in g]
        return sum(rewards) / max(1, len(rewards))

    # ---- checkpoint state ------------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        return {"step": step, "version": self.version, "source": self.source.state_dict(),
                "buffer": self.buffer.state_dict(), "rollout_counters": dict(self.ctx.counters),
                "python_rng": list(random.getstate()[1]), "metrics": self.metrics.history}

    def load_state_dict(self, state: dict[str, Any]) -> int:
        self.source.load_state_dict(state["source"])
        self.buffer.load_state_dict(state["buffer"])
        self.ctx.counters = dict(state["rollout_counters"])
        random.setstate((3, tuple(state["python_rng"]), None))
        self.metrics.history = list(state["metrics"])
        return int(state["step"])
