"""GPU tests (skipped without CUDA; run on the device by scripts/device_run.sh): the colocated loop of
configs/grpo_gpu.yaml for a few steps — vLLM engine and Megatron trainer (bf16) on one GPU, the engine asleep
while the trainer runs, weights pushed through CUDA IPC. One short run is shared by the checks below."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

MODEL = Path(os.environ.get("VIME_MODELS", "models")) / "qwen2-0.5b"


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, repo_root):
    from vime.config import load_config
    from vime.loop import train
    from vime.models import make_model

    if not (MODEL / "config.json").exists():
        make_model("qwen2", "0.5b", MODEL, dtype="bfloat16", device="cuda")
    out = tmp_path_factory.mktemp("grpo_gpu")
    cfg = load_config(
        repo_root / "configs" / "grpo_gpu.yaml",
        [
            f"model.path={MODEL}",
            f"run.out_dir={out}",
            "loop.sft_steps=20",
            "loop.num_steps=2",
            "loop.eval_every=0",
            "loop.eval_size=16",
        ],
    )
    return train(cfg, progress=False)


def steps(run):
    return [h for h in run["history"] if h.get("step", 0) >= 1 and "rollout/reward" in h]


def test_engine_matches_trainer_after_ipc_push(gpu_run):
    """Rollout log-probs come from the engine after a push of weights the SFT warm start changed; they must
    equal the trainer's (bf16 kernels differ a little; a missed push is off by nats)."""
    for h in steps(gpu_run):
        assert h["consistency/mean_abs_diff"] < 0.05, h
        assert h["consistency/max_abs_diff"] < 1.0, h
        assert h["sync/push_s"] > 0


def test_sleep_frees_and_wake_restores_memory(gpu_run):
    hs = steps(gpu_run)
    freed = [h["memory/engine_sleep_freed_gb"] for h in hs if "memory/engine_sleep_freed_gb" in h]
    woke = [h["sync/memory/engine_wake_used_gb"] for h in hs if "sync/memory/engine_wake_used_gb" in h]
    assert freed and woke, hs
    assert min(freed) > 5.0  # KV cache (0.3 of the card) + offloaded weights
    assert min(woke) > 5.0


def test_one_grpo_step(gpu_run):
    hs = steps(gpu_run)
    assert len(hs) == 2
    for h in hs:
        assert math.isfinite(h["train/loss"]) and h["train/samples"] == 256
        assert h["time/rollout"] > 0 and h["time/train"] > 0 and h["time/weight_sync"] > 0


def test_ppo_with_a_critic_and_an_offloaded_kl_reference_on_one_gpu(tmp_path, repo_root):
    """PPO on the colocated GPU recipe: the critic shares the trainer's GPU (a quarter each to Ray, the engine
    asleep while they train), GAE over its values, and the KL reference is built, used and moved back to host
    memory each step (trainer.offload_reference). Two steps run with finite value loss and KL, the clip acts, and
    the engine still matches the trainer after the pushes."""
    from vime.config import load_config
    from vime.loop import train
    from vime.models import make_model

    if not (MODEL / "config.json").exists():
        make_model("qwen2", "0.5b", MODEL, dtype="bfloat16", device="cuda")
    cfg = load_config(
        repo_root / "configs" / "grpo_gpu.yaml",
        [
            f"model.path={MODEL}",
            f"run.out_dir={tmp_path}",
            "loop.sft_steps=5",
            "loop.num_steps=2",
            "loop.eval_every=0",
            "loop.eval_size=16",
            "algorithm.name=ppo",
            "algorithm.kl_coef=0.001",
            "algorithm.ppo_epochs=2",
            "algorithm.mini_batch_size=128",
            "critic.lr=0.00001",
            "critic.dtype=bfloat16",
            "critic.micro_batch_size=64",
        ],
    )
    hs = steps(train(cfg, progress=False))
    assert len(hs) == 2
    for h in hs:
        assert math.isfinite(h["critic/loss"]) and math.isfinite(h["train/kl_ref"]) and h["train/kl_ref"] >= 0, h
        assert h["consistency/mean_abs_diff"] < 0.05, h
    assert hs[-1]["train/clip_frac"] >= 0 and hs[-1]["train/ratio_max"] > 0, hs[-1]


def test_split_placement_nccl_step(tmp_path, repo_root):
    """Two GPUs: trainer on one, engine on the other, weights through vLLM's NCCL engine (configs/
    grpo_2gpu_nccl.yaml); engine log-probs after the push equal the trainer's."""
    import torch

    from vime.config import load_config
    from vime.loop import train
    from vime.models import make_model

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    if not (MODEL / "config.json").exists():
        make_model("qwen2", "0.5b", MODEL, dtype="bfloat16", device="cuda")
    cfg = load_config(
        repo_root / "configs" / "grpo_2gpu_nccl.yaml",
        [f"model.path={MODEL}", f"run.out_dir={tmp_path}", "loop.sft_steps=5", "loop.num_steps=1"],
    )
    (h,) = steps(train(cfg, progress=False))
    assert h["consistency/mean_abs_diff"] < 0.05 and h["sync/push_s"] > 0


def test_logprobs_match_log_softmax_at_qwen_vocab():
    """The log-prob function as the trainer runs it on a GPU (bf16 logits over Qwen2.5's 151,936 columns, in the
    [s, b, V] layout Megatron hands to LogProbHead) against `log_softmax` in fp32: value, entropy, gradient."""
    import torch
    from logprob_oracle import both, one_rank

    with one_rank():
        g = torch.Generator(device="cuda").manual_seed(0)
        base = (torch.randn(64, 2, 151936, generator=g, device="cuda") * 3).bfloat16()
        targets = torch.randint(0, 151936, (64, 2), generator=g, device="cuda")
        weights = torch.randn(64, 2, generator=g, device="cuda")
        for temperature in (1.0, 0.7):
            got, ref = both(base, targets, weights, temperature)
            assert (got["logp"] - ref["logp"]).abs().max() < 1e-4
            assert (got["entropy"] - ref["entropy"]).abs().max() < 1e-3
            assert got["grad"].dtype == torch.bfloat16
            assert torch.allclose(got["grad"].float(), ref["grad"].float(), atol=1e-3, rtol=2e-2)  # bf16: 1/128 steps


def test_gateway_structured_output_and_responses_on_the_gpu_vllm(tmp_path):
    """The gateway on the GPU line's vLLM: a named tool_choice is decoded under the engine's structured output and
    comes back as a parsed call; a Responses chain is one session whose second prompt extends the first's exact
    ids."""
    import json

    import openai
    from transformers import AutoTokenizer

    from engines.vllm.config import VLLMEngineConfig
    from vime.gateway.config import GatewayConfig
    from vime.gateway.server import Gateway
    from vime.models import make_model
    from vime.specs import make_engine_group

    if not (MODEL / "config.json").exists():
        make_model("qwen2", "0.5b", MODEL, dtype="bfloat16", device="cuda")
    args = {
        "enforce_eager": True,
        "dtype": "bfloat16",
        "max_model_len": 2048,
        "gpu_memory_utilization": 0.3,
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    }
    group = make_engine_group(VLLMEngineConfig(args=args, startup_timeout_s=400), str(MODEL), str(tmp_path)).start()
    try:
        tok = AutoTokenizer.from_pretrained(MODEL)
        with Gateway(group, tok, GatewayConfig(api_key="k", model_name="q", context_length=2048)) as gw:
            c = openai.OpenAI(base_url=gw.session_url("s"), api_key="k", max_retries=0)
            params = {"type": "object", "properties": {"country": {"type": "string", "enum": ["france", "italy"]}}}
            tool = {"type": "function", "function": {"name": "capital", "parameters": params}}
            r = c.chat.completions.create(
                model="q",
                messages=[{"role": "user", "content": "The capital of France?"}],
                tools=[tool],
                tool_choice={"type": "function", "function": {"name": "capital"}},
                max_tokens=64,
            )
            (call,) = r.choices[0].message.tool_calls
            assert call.function.name == "capital", r
            assert json.loads(call.function.arguments)["country"] in ("france", "italy"), r
            r1 = c.responses.create(model="q", input="2+2=", max_output_tokens=8)
            r2 = c.responses.create(model="q", input="and 3+3=", previous_response_id=r1.id, max_output_tokens=8)
            p1, o1 = r1.model_extra["prompt_token_ids"], r1.model_extra["output_token_ids"]
            assert r2.model_extra["prompt_token_ids"][: len(p1) + len(o1)] == p1 + o1
    finally:
        group.stop()


def test_mla_engine_rederives_its_absorbed_attention_on_a_push(tmp_path):
    """DeepSeek-V3's multi-latent attention keeps weights derived from `kv_b_proj` at load (W_UK and W_UV absorbed
    into the attention kernel); a push that updated the parameter but not those would leave the engine computing
    with the old model's attention while its parameters, and the push's check, say new. vLLM's layerwise reload
    re-runs the attention layer's post-load processing; this pushes a whole second random model into a running
    GPU engine and compares it with an engine started on that model: the same sampled tokens and log-probs, and
    as close to transformers' as the fresh engine is (a random bf16 MLA model is ~0.26 nats from transformers'
    fp32 on an H100 either way, so transformers alone cannot say "close")."""
    import asyncio
    from itertools import takewhile

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from engines.vllm.config import VLLMEngineConfig
    from engines.vllm.weight_channel import VLLMWeightChannel
    from vime.models import make_model
    from vime.specs import make_engine_group
    from vime.types import Sample, SamplingParams

    old = make_model("deepseek_v3", "small", tmp_path / "old", dtype="bfloat16", device="cuda", seed=0)
    new = make_model("deepseek_v3", "small", tmp_path / "new", dtype="bfloat16", device="cuda", seed=1)
    hf_new = AutoModelForCausalLM.from_pretrained(new, dtype=torch.float32).cuda().eval()
    args = {"enforce_eager": True, "dtype": "bfloat16", "max_model_len": 512, "gpu_memory_utilization": 0.2}
    prompt = [1, *range(40, 60)]

    def start(path):
        cfg = VLLMEngineConfig(args=args, startup_timeout_s=400)
        return make_engine_group(cfg, str(path), str(tmp_path / f"logs_{path.name}"), weights_backend="disk").start()

    def sampled(group) -> list[list[tuple[int, float]]]:
        (cs,) = asyncio.run(group.engines[0].generate([prompt], SamplingParams(n=4, max_tokens=16, seed=3)))
        return [list(zip(Sample.from_completion(prompt, c).response_ids, c.logprobs)) for c in cs]

    def gap_to_hf(samples: list[list[tuple[int, float]]]) -> float:
        gaps = []
        for s in samples:
            ids = torch.tensor([prompt + [t for t, _ in s]], device="cuda")
            with torch.no_grad():
                logp = torch.log_softmax(hf_new(ids).logits[0].double(), -1)
            ref = logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt) :]].tolist()
            gaps += [abs(lp - r) for (_, lp), r in zip(s, ref)]
        return sum(gaps) / len(gaps)

    group = start(old)
    try:
        before = sampled(group)
        sd = {k: v for f in sorted(new.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        assert any(k.endswith("kv_b_proj.weight") for k in sd), sorted(sd)[:8]
        items = sorted(sd.items())
        ch = VLLMWeightChannel({"backend": "disk", "disk_dir": str(tmp_path)}, group.urls())
        try:
            ch.push([items[i : i + 40] for i in range(0, len(items), 40)], "mla1")
        finally:
            ch.close()
        after = sampled(group)
    finally:
        group.stop()
    group = start(new)
    try:
        fresh = sampled(group)
    finally:
        group.stop()
    same = [
        (a[1], b[1]) for sa, sb in zip(after, fresh) for a, b in takewhile(lambda ab: ab[0][0] == ab[1][0], zip(sa, sb))
    ]
    total = sum(len(s) for s in fresh)
    gap = sum(abs(a - b) for a, b in same) / max(1, len(same))
    hf = {"before": gap_to_hf(before), "after": gap_to_hf(after), "fresh": gap_to_hf(fresh)}
    report = f"to transformers {hf}; pushed vs fresh engine: {len(same)}/{total} tokens equal, mean |dlogp| {gap:.4f}"
    assert len(same) >= 0.8 * total and gap < 0.02, report
    assert hf["after"] <= 1.5 * hf["fresh"] + 0.02 and hf["before"] > 5 * hf["after"], report


def test_replayed_load_and_captured_sums_on_the_gpu(tmp_path, repo_root):
    """The ipc push's CUDA paths on vLLM's own Qwen2 (in a fresh process): the recorded load replayed as a CUDA graph
    writes exactly what `load_weights` writes, the captured bit sums and the staging buffer's chunked sums equal
    the per-tensor ones (`benchmarks/bench_load_plan.py` asserts all three)."""
    import subprocess
    import sys

    env = {**os.environ, "VIME_MODELS": str(tmp_path), "VIME_BENCH_OUT": str(tmp_path / "out")}
    r = subprocess.run(
        [sys.executable, str(repo_root / "benchmarks" / "bench_load_plan.py"), "tiny"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "'replay_equals_load_weights': True" in r.stdout, r.stdout[-3000:]
