"""Every CPU recipe in configs/ loads, and its algorithm (estimator, loss, aggregation) trains two steps on the real
Megatron trainer. The engine side is the same for all of them (`make train` and tests/test_loop.py run it)."""

from __future__ import annotations

import math

import pytest
from conftest import make_samples

from vime.algorithms.recipe import estimate
from vime.config import ConfigError, load_config
from vime.trainer import TrainerConfig

pytestmark = pytest.mark.slow


def groups_of(samples, size=4):
    for j, s in enumerate(samples):
        s.reward = float((j * 7) % 3 == 0)
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def test_every_cpu_recipe_trains_two_steps(ray_cluster, repo_root, model_dir):
    from trainers.megatron.trainer import MegatronTrainer

    recipes = sorted((repo_root / "configs").glob("*_tiny_cpu.yaml"))
    assert len(recipes) >= 8
    with MegatronTrainer(TrainerConfig(micro_batch_size=4, lr=1e-2), model_path=str(model_dir("qwen2"))) as tr:
        for path in recipes:
            algo = load_config(path).algorithm
            groups = groups_of(make_samples(12, seed=9))
            # PPO's advantages need a critic's values (its own tests run one); here a flat baseline of 0.2
            values = [[0.2] * len(s.response_ids) for g in groups for s in g] if algo.estimator == "gae" else None
            samples, _ = estimate(groups, algo, values=values)
            assert any(a != 0 for s in samples for a in s.token_advantages), path.name
            old = tr.logprobs(samples)
            kwargs = algo.loss_kwargs() | {"max_len": 6}
            steps = [tr.train_step(samples, algo.loss, kwargs, old_logprobs=old) for _ in range(2)]
            assert all(math.isfinite(s["loss"]) and s["skipped_nonfinite"] == 0 for s in steps), (path.name, steps)
            assert tr.logprobs(samples) != old, f"{path.name}: two steps did not move the policy"


def test_a_recipe_says_only_what_it_changes(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "model: {path: m}\ndata: {path: d.jsonl}\nrollout: {batch_size: 4, n_samples: 2}\nalgorithm: {name: grpo}\n"
    )
    (tmp_path / "b.yaml").write_text("base: a.yaml\nrollout: {n_samples: 3}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.rollout.batch_size, cfg.rollout.n_samples, cfg.algorithm.name) == (4, 3, "grpo")
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="names itself through base"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("base: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"nope.yaml' does not exist \(base: of"):
        load_config(tmp_path / "e.yaml")
