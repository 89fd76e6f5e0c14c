"""In-place weight pushes into running vLLM-CPU engines through vLLM's weight-transfer API."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import hf_response_logprobs, start_engines
from net_audit import beyond_loopback, listeners, ray_beyond_loopback
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from engines.vllm.weight_channel import VLLMWeightChannel
from vime.types import Sample, SamplingParams
from vime.weights import WeightPushError

pytestmark = pytest.mark.slow


def new_weights(model_dir, arch, seed):
    """A second weight set of the same architecture (a different seed)."""
    from vime.models import make_model

    d = make_model(arch, "tiny", model_dir(arch).parent / f"{arch}-seed{seed}", seed=seed)
    return d, load_file(str(d / "model.safetensors"))


def buckets(sd, per_bucket=5):
    items = sorted(sd.items())
    return [items[i : i + per_bucket] for i in range(0, len(items), per_bucket)]


def engine_vs_hf(engine, hf_model, prompt, seed=1):
    (cs,) = asyncio.run(engine.generate([prompt], SamplingParams(n=2, max_tokens=12, seed=seed)))
    worst = 0.0
    for c in cs:
        ref = hf_response_logprobs(hf_model, Sample.from_completion(prompt, c))
        worst = max(worst, *(abs(a - b) for a, b in zip(c.logprobs, ref)))
    return worst, cs


def hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


CACHED = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58]  # > one KV block
FRESH = [1, 60, 61, 62, 63, 64, 65]


def test_gloo_push_two_engines_tied(qwen2_engines, model_dir):
    old, _ = engine_vs_hf(qwen2_engines.engines[0], hf(model_dir("qwen2")), CACHED)  # warms the prefix cache
    assert old < 1e-3
    new_dir, sd = new_weights(model_dir, "qwen2", seed=7)
    ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60}, qwen2_engines.urls())
    try:
        stats = ch.push(buckets(sd), "v1")
    finally:
        ch.close()
    assert stats["bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    ref_new, ref_old = hf(new_dir), hf(model_dir("qwen2"))
    for eng in qwen2_engines.engines:
        assert asyncio.run(eng.weight_version()) == "v1"
        for prompt in (CACHED, FRESH):
            worst, cs = engine_vs_hf(eng, ref_new, prompt)
            assert worst < 1e-3, f"after push: engine vs HF(new) {worst}"
            assert all(c.weight_versions == ["v1"] * len(c.token_ids) for c in cs)
            before = max(
                abs(a - b)
                for c in cs
                for a, b in zip(c.logprobs, hf_response_logprobs(ref_old, Sample.from_completion(prompt, c)))
            )
            assert before > 1e-2  # the engine really changed


def test_generation_spanning_a_push_carries_both_versions(qwen2_engines, model_dir):
    """weights.pause_mode=keep (the async loop's partial rollouts): a generation in flight freezes during the push
    and goes on under the new weights; the engine tags each token with the version that sampled it."""
    eng = qwen2_engines.engines[0]
    before = asyncio.run(eng.weight_version())
    _, sd = new_weights(model_dir, "qwen2", seed=7)
    # long enough that the push lands mid-generation even on a loaded machine (300 tokens were over before the
    # pause reached the engine once in CI); the prompt is 7 tokens, the fixture's context 2048
    n = 1800
    params = SamplingParams(max_tokens=n, seed=2, extra={"ignore_eos": True})
    # connected before the generation starts: the push begins with the pause, so it lands mid-generation
    ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60, "pause_mode": "keep"}, qwen2_engines.urls())
    ch.connect()

    async def generate_across_a_push():
        pushed, seen = None, 0
        async for c in eng.stream(FRESH, params):
            seen = len(c.token_ids)
            if pushed is None and seen >= 4:
                pushed = asyncio.create_task(asyncio.to_thread(ch.push, buckets(sd), "span"))
            last = c
        assert pushed is not None, f"the generation ended after {seen} tokens, before the push began"
        stats = await pushed
        return last, stats

    try:
        c, stats = asyncio.run(generate_across_a_push())
    finally:
        ch.close()
    v = c.weight_versions
    assert len(v) == len(c.token_ids) == n, (len(v), len(c.token_ids))
    switch = v.index("span") if "span" in v else None
    # the tokens before the push keep the old version
    assert switch is not None and switch >= 4, f"no token sampled by the pushed weights; push {stats}, versions {v}"
    assert v == [before] * switch + ["span"] * (n - switch), v  # one switch, old then new


def test_trainer_pushes_through_gloo(qwen2_engines, model_dir, ray_cluster):
    from trainers.megatron.trainer import MegatronTrainer
    from vime.trainer import TrainerConfig

    before = listeners()
    with MegatronTrainer(
        TrainerConfig(tp=2, world_size=2, micro_batch_size=2, lr=1e-2), model_path=str(model_dir("qwen2"))
    ) as tr:
        s = Sample(prompt_ids=FRESH, response_ids=[70, 71, 72, 73], logprobs=[0.0] * 4, advantage=1.0)
        tr.train_step([s, s], "policy")
        tr.connect_weights(
            "engines.vllm.weight_channel:VLLMWeightChannel", {"backend": "gloo", "bucket_mb": 1}, qwen2_engines.urls()
        )
        stats = tr.push_weights("t1")
        assert stats["bytes"] > 0
        # what the trainer and its push opened (ranks' rendezvous store, gloo, the channel's store) and Ray's own
        # servers listen on loopback only (the whole tree is not asserted: other tests' processes come and go)
        opened = {k: v for k, v in listeners().items() if k not in before}
        assert beyond_loopback(opened) == [] and ray_beyond_loopback() == []
        for eng in qwen2_engines.engines:
            (cs,) = asyncio.run(eng.generate([CACHED], SamplingParams(n=2, max_tokens=12, seed=3)))
            samples = [Sample.from_completion(CACHED, c) for c in cs]
            lps = tr.logprobs(samples)
            worst = max(abs(a - b) for smp, lp in zip(samples, lps) for a, b in zip(smp.logprobs, lp))
            assert worst < 1e-3
            assert asyncio.run(eng.weight_version()) == "t1"


def test_disk_push_untied(model_dir, tmp_path):
    group = start_engines(model_dir("llama"), tmp_path, weights="disk")
    try:
        eng = group.engines[0]
        engine_vs_hf(eng, hf(model_dir("llama")), CACHED)
        new_dir, sd = new_weights(model_dir, "llama", seed=9)
        assert "lm_head.weight" in sd
        ch = VLLMWeightChannel({"backend": "disk", "disk_dir": str(tmp_path)}, group.urls())
        ch.push(buckets(sd), "d1")
        ch.close()
        assert asyncio.run(eng.weight_version()) == "d1"
        ref = hf(new_dir)
        for prompt in (CACHED, FRESH):
            assert engine_vs_hf(eng, ref, prompt)[0] < 1e-3
        assert not list(tmp_path.glob("vime-*.safetensors"))  # buckets are cleaned up
    finally:
        group.stop()


def _slow_sender(urls, sd_path, started):
    sd = load_file(sd_path)
    ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 20}, urls)

    def slow():
        for b in buckets(sd, per_bucket=2):
            started.set()
            yield b
            time.sleep(2.0)

    ch.push(slow(), "never")


def test_killed_sender_leaves_no_silently_wrong_engine(qwen2_engines, model_dir):
    new_dir, _ = new_weights(model_dir, "qwen2", seed=11)
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    p = ctx.Process(target=_slow_sender, args=(qwen2_engines.urls(), str(new_dir / "model.safetensors"), started))
    p.start()
    assert started.wait(120)
    time.sleep(1.0)
    p.kill()
    p.join()
    # the engines never reached the version: they are not allowed to serve; recovery restarts and re-syncs
    versions = [asyncio.run(e.weight_version()) if asyncio.run(e.healthy()) else None for e in qwen2_engines.engines]
    assert "never" not in versions
    with ThreadPoolExecutor(2) as pool:  # side by side: each restart is tens of seconds of imports
        list(pool.map(qwen2_engines.restart, range(len(qwen2_engines.servers))))
    ref = hf(model_dir("qwen2"))
    for eng in qwen2_engines.engines:
        assert asyncio.run(eng.weight_version()) == "default"
        assert engine_vs_hf(eng, ref, CACHED)[0] < 1e-3  # consistent: the model directory's weights
    # and the restarted engines accept a fresh channel
    _, sd = new_weights(model_dir, "qwen2", seed=7)
    ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60}, qwen2_engines.urls())
    ch.push(buckets(sd), "v2")
    ch.close()
    assert [asyncio.run(e.weight_version()) for e in qwen2_engines.engines] == ["v2", "v2"]


def test_push_to_unreachable_engine_fails_clearly():
    ch = VLLMWeightChannel({"backend": "disk", "timeout_s": 5}, ["http://127.0.0.1:9"])
    with pytest.raises(WeightPushError, match="127.0.0.1:9"):
        ch.push([], "x")
    ch.close()
