"""Prefill/decode-disaggregated serving on CPU: NixlConnector over UCX loopback, behind vllm-router.

The pair serves the tiny Qwen3-MoE without prefix caching, so the same two servers also carry routing replay's
P/D case (the prompt's routes are on the prefill server, the sampled tokens' on the decode server)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
from conftest import ENGINE_ARGS, hf_response_logprobs
from pd_oracle import pd_completion
from transformers import AutoModelForCausalLM

from engines.common.process import log_tail
from engines.vllm.config import VLLMEngineConfig as EngineConfig
from engines.vllm.group import ROUTER_LOST
from engines.vllm.weight_channel import VLLMWeightChannel
from vime.secret import auth_headers
from vime.specs import make_engine_group
from vime.types import Sample, SamplingParams

ENGINE_HTTP = httpx.Client(headers=auth_headers(), timeout=30)  # the run's secret; 30 s: a loaded server is slow

pytestmark = pytest.mark.slow
ARCH = "qwen3_moe"


@pytest.fixture(scope="module")
def pd(model_dir, tmp_path_factory):
    cfg = EngineConfig(
        topology="pd",
        args={**ENGINE_ARGS, "block_size": 32, "enable_prefix_caching": False},
        router={"args": {"health_check_interval_secs": 30, "disable_retries": False}},  # verbatim, as a user would
        startup_timeout_s=300,
        request_timeout_s=60,
    )
    group = make_engine_group(
        cfg, str(model_dir(ARCH)), str(tmp_path_factory.mktemp("pd-logs")), weights_backend="gloo"
    ).start()
    yield group
    group.stop()


def kv_tokens(url: str) -> dict[str, float]:
    out = {}
    for line in ENGINE_HTTP.get(url + "/metrics").text.splitlines():
        if line.startswith("vllm:prompt_tokens_by_source_total{"):
            out[line.split('source="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def answer(r: httpx.Response) -> dict:
    """The reply's JSON, or a failure that shows what the server or router said (a reply without `choices`
    under load was once all a failed run showed)."""
    assert r.status_code == 200 and "choices" in r.text, f"{r.request.url} -> {r.status_code}: {r.text[:800]}"
    return r.json()


def body(model, prompt, **kw):
    return {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0.0, "return_token_ids": True, **kw}


def test_greedy_tokens_equal_single_server_and_kv_is_transferred(pd, model_dir):
    prefill, decode = pd.urls()
    router = pd.router.base_url
    model = str(model_dir(ARCH))
    for k, n in enumerate((137, 70, 33)):  # fresh prompts: no prefix-cache hit can hide a missing transfer
        prompt = [3 + (k * 37 + i * 7) % 500 for i in range(n)]
        before = kv_tokens(decode)
        via_router = answer(ENGINE_HTTP.post(router + "/v1/completions", json=body(model, prompt), timeout=60))
        after = kv_tokens(decode)
        single = answer(ENGINE_HTTP.post(prefill + "/v1/completions", json=body(model, prompt), timeout=60))
        assert via_router["choices"][0]["token_ids"] == single["choices"][0]["token_ids"]
        assert after["external_kv_transfer"] - before["external_kv_transfer"] == n
        assert after["local_compute"] == before["local_compute"]
    # the hand-made 3-step protocol (the oracle) agrees with the router
    prompt = [5 + i % 400 for i in range(90)]
    oracle = pd_completion(prefill, decode, body(model, prompt))
    routed = answer(ENGINE_HTTP.post(router + "/v1/completions", json=body(model, prompt), timeout=60))
    assert oracle["choices"][0]["token_ids"] == routed["choices"][0]["token_ids"]


def test_chat_and_streaming_through_router(pd, model_dir):
    prefill, router, model = pd.urls()[0], pd.router.base_url, str(model_dir(ARCH))
    chat = {"model": model, "messages": [{"role": "user", "content": "12+7="}], "max_tokens": 10, "temperature": 0.0}
    a = answer(ENGINE_HTTP.post(router + "/v1/chat/completions", json=chat, timeout=60))
    b = answer(ENGINE_HTTP.post(prefill + "/v1/chat/completions", json=chat, timeout=60))
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    for path, req, key in (
        ("/v1/chat/completions", chat, "delta"),
        ("/v1/completions", body(model, [7] * 40, return_token_ids=False), "text"),
    ):
        text = ""
        with ENGINE_HTTP.stream("POST", router + path, json={**req, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ch = json.loads(line[6:])["choices"]
                    if ch:
                        text += (ch[0]["delta"].get("content") or "") if key == "delta" else ch[0]["text"]
        plain = ENGINE_HTTP.post(prefill + path, json=req, timeout=60).json()["choices"][0]
        assert text == (plain["message"]["content"] if key == "delta" else plain["text"])


def test_routing_replay_routes_span_both_servers_and_equal_transformers(pd, model_dir):
    """R3 under P/D: the prompt's positions are computed on the prefill server only (its KV is transferred), the
    sampled tokens' on the decode server; the sample's routes, merged from both, are transformers' top-k at every
    position. Runs before the push test, while both servers hold the checkpoint."""
    from test_moe import hf_topk, r3_samples
    from test_trainer_megatron import hf

    model = hf(model_dir(ARCH))
    prompts = [[3 + (i * 13) % 400 for i in range(41)], [7, 8, 9, 10, 11]]  # > and < one 32-token block
    before = kv_tokens(pd.urls()[1])
    samples = r3_samples(pd.engines[0], prompts)
    after = kv_tokens(pd.urls()[1])
    assert after["local_compute"] == before["local_compute"], "the decode server computed prompt positions itself"
    for s in samples:
        tokens = s.prompt_ids + s.response_ids
        ref = hf_topk(model, tokens)[: len(tokens) - 1]
        got = [[set(ks) for ks in pos] for pos in (s.routed_experts if s.routed_experts is not None else [])]
        wrong = [(t, got[t], ref[t]) for t in range(len(ref)) if t >= len(got) or got[t] != ref[t]]
        assert len(got) == len(ref) and not wrong, (len(got), len(ref), wrong[:3])


def test_engine_adapter_over_router_and_weight_push_reaches_both(pd, model_dir):
    from safetensors.torch import load_file

    from vime.models import make_model

    new_dir = make_model(ARCH, "tiny", model_dir(ARCH).parent / "moe-pd-new", seed=21)
    sd = load_file(str(new_dir / "model.safetensors"))
    ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60}, pd.urls())
    ch.push([sorted(sd.items())], "pd1")
    ch.close()
    assert [ENGINE_HTTP.get(u + "/weight_info").json()["weight_version"] for u in pd.urls()] == ["pd1", "pd1"]
    ref = AutoModelForCausalLM.from_pretrained(new_dir, dtype=torch.float32, attn_implementation="eager")
    prompt = [3 + (i * 11) % 500 for i in range(64)]
    (cs,) = asyncio.run(pd.engines[0].generate([prompt], SamplingParams(n=1, max_tokens=12, seed=5)))
    lp = hf_response_logprobs(ref, Sample.from_completion(prompt, cs[0]))
    assert max(abs(a - b) for a, b in zip(cs[0].logprobs, lp)) < 1e-3


def metric_sum(url: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in ENGINE_HTTP.get(url + "/metrics").text.splitlines()
        if line.startswith((name + "{", name + " "))
    )


def test_n_samples_each_pull_their_own_prefill(pd, model_dir):
    """n > 1 through P/D: sent as one request, the prefill server computed n copies, the router handed the decode
    server one copy's KV address, all n decode children read it (the prefill released it after the first read:
    "Potentially invalid KV blocks ... retrieved by a decode worker") and the other n-1 copies stayed held until
    their 30 s lease ran out — the next weight push's pause waited for them (23 s a push in the P/D loop test)."""
    prefill, decode = pd.urls()
    prompt = [7 + (i * 13) % 480 for i in range(70)]
    late = metric_sum(prefill, "vllm:nixl_num_notifications_after_expiry")
    before = kv_tokens(decode)
    params = SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=11)
    (cs,) = asyncio.run(pd.engines[0].generate([prompt], params))
    assert len(cs) == 4 and len({tuple(c.token_ids) for c in cs}) > 1, [c.token_ids for c in cs]
    assert kv_tokens(decode)["external_kv_transfer"] - before["external_kv_transfer"] == 4 * len(prompt)
    deadline, usage = time.monotonic() + 15, None  # the lease is 30 s: blocks still held at 15 s were never read
    while time.monotonic() < deadline:
        usage = metric_sum(prefill, "vllm:kv_cache_usage_perc")
        if usage == 0:
            break
        time.sleep(0.5)
    assert usage == 0, f"the prefill server still holds KV blocks ({usage:.1%} of its cache) no decode read"
    assert metric_sum(prefill, "vllm:nixl_num_notifications_after_expiry") == late, "a decode read released blocks"


def test_router_is_no_way_around_the_engine_guard(pd, model_dir):
    """vllm-router forwards any path to both servers with its own key; that key is good for generation only, so
    a caller without the run's secret can generate through the router but not pause, sleep or update an engine."""
    router = pd.router.base_url

    def unkeyed(path: str, req: dict | None) -> httpx.Response:
        """A request the router refused for want of a server never reached the guard: under load vllm-router drops a
        live server from its table (CI, stop 41: "0 decode" on the first path). vime's engine restarts it on its next
        request (test below); do that here and ask again, so the answer is the engines'."""
        r = httpx.post(router + path, json=req or {}, timeout=60)  # no Authorization header
        if r.status_code == 503 and ROUTER_LOST in r.text:
            asyncio.run(pd.engines[0].generate([[3, 4, 5, 6]], SamplingParams(max_tokens=2, temperature=0.0)))
            r = httpx.post(router + path, json=req or {}, timeout=60)
        return r

    for path, req in [
        ("/pause", None),
        ("/sleep", None),
        ("/collective_rpc", {"method": "vime_refresh_tied_lm_head"}),
        ("/vime/push", {"update": {}, "pause": "abort"}),
        ("/start_weight_update", None),
        ("/init_weight_transfer_engine", {"init_info": {}}),
    ]:
        r = unkeyed(path, req)
        assert (r.status_code >= 400 and "401" in r.text) or r.status_code == 401, (
            path,
            r.status_code,
            r.text[:300],
            log_tail(pd.router.log_path, 15),
        )
    for u in pd.urls():
        state = {p: ENGINE_HTTP.get(u + p, timeout=30).json() for p in ("/is_paused", "/is_sleeping")}
        assert state == {"/is_paused": {"is_paused": False}, "/is_sleeping": {"is_sleeping": False}}, (u, state)
    r = unkeyed("/v1/completions", body(str(model_dir(ARCH)), [1, 2, 3]))
    assert r.status_code == 200 and r.json().get("choices"), r.text[:500]


def test_router_flags_pass_through_verbatim(pd):
    """`engine.router.args` reach the router as they are written (a false switch is left out), and the real router
    accepted them: it is the one serving every test here."""
    cmd = pd.router.command()
    assert cmd[cmd.index("--health-check-interval-secs") + 1] == "30"
    assert "--disable-retries" not in cmd


def test_router_that_lost_a_live_server_is_restarted_and_the_request_still_served(pd, caplog):
    """vllm-router once dropped the live decode server from its table mid-run and answered "No available workers:
    1 prefill, 0 decode" from then on (CI, stop 35). Its own admin route does the same on purpose here; the engine
    sees both servers healthy, restarts the router (same port) once and generates, or streams."""
    router = pd.router
    decode = pd.urls()[1]
    r = httpx.post(router.base_url + "/remove_worker", params={"url": decode}, timeout=10)
    assert r.status_code == 200, r.text
    lost = ENGINE_HTTP.post(router.base_url + "/v1/completions", json=body(pd.model_path, [3, 4, 5]), timeout=60)
    assert lost.status_code == 503 and "0 decode" in lost.text, lost.text  # the state CI saw
    pid = router.proc.pid
    with caplog.at_level("WARNING", logger="engines.vllm.group"):
        out = asyncio.run(pd.engines[0].generate([[3, 4, 5, 6]], SamplingParams(max_tokens=4, temperature=0.0)))
    assert len(out[0][0].token_ids) == 4
    assert router.proc.pid != pid and router.alive()
    assert "restarting it" in caplog.text

    async def streamed() -> list:
        return [c async for c in pd.engines[0].stream([3, 4, 5, 6], SamplingParams(max_tokens=4, temperature=0.0))]

    httpx.post(router.base_url + "/remove_worker", params={"url": decode}, timeout=10).raise_for_status()
    pid = router.proc.pid
    last = asyncio.run(streamed())[-1]  # a stream that fails before its first token is asked again, too
    assert last.token_ids == out[0][0].token_ids and last.finish_reason != ""
    assert router.proc.pid != pid


def test_killed_prefill_gives_error_not_hang(pd, model_dir):
    pd.servers[0].stop()
    t = time.monotonic()
    with pytest.raises(Exception):
        asyncio.run(pd.engines[0].generate([[3, 4, 5, 6]], SamplingParams(max_tokens=4)))
    assert time.monotonic() - t < 65


def test_plain_pool_behind_router_keeps_sessions_sticky(qwen2_engines, model_dir, tmp_path):
    """vllm-router with consistent_hash in front of the two shared servers: the session header vime sends
    keeps each session on one server."""
    from engines.vllm.group import VLLMEngine
    from engines.vllm.router import VLLMRouter

    def served():
        out = []
        for u in qwen2_engines.urls():
            text = ENGINE_HTTP.get(u + "/metrics").text
            out.append(
                sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("vllm:request_success_total{")
                )
            )
        return out

    router = VLLMRouter(
        host="127.0.0.1",
        prefill=[],
        decode=[],
        workers=qwen2_engines.urls(),
        kv_connector="nixl",
        policy="consistent_hash",
        log_path=tmp_path / "router.log",
        version=qwen2_engines.servers[0].version,
    ).start()
    try:
        eng = VLLMEngine(router, 60, route="completions", model=str(model_dir("qwen2")))
        hit: set[int] = set()
        for k in range(24):  # until both servers got sessions: 6 fixed names all hashed to one server in 1 run of ~30
            if hit == {0, 1} and k >= 6:
                break
            sid = f"session-{k}"
            before = served()
            for _ in range(3):
                asyncio.run(eng.generate([[1, 5, 6, 7]], SamplingParams(max_tokens=2), session=sid))
            delta = [b - a for a, b in zip(before, served())]
            assert sorted(delta) == [0, 3], (sid, delta)  # all three requests on one server
            hit.add(delta.index(3))
        assert hit == {0, 1}  # and the sessions spread over both
    finally:
        router.stop()
