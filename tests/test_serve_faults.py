"""`vime serve` survives its engines: the gateway's pool is supervised, so a killed server's requests are re-issued
elsewhere, requests go to the other server while it restarts, and they come back to it once it is up."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import psutil
import pytest
from conftest import start_engines
from transformers import AutoTokenizer

from engines.vllm.server import SERVER_MODULE
from vime.gateway.config import GatewayConfig
from vime.gateway.server import Gateway
from vime.secret import auth_headers
from vime.supervise import SupervisedPool

pytestmark = pytest.mark.slow


def served(url: str) -> float:
    text = httpx.get(url + "/metrics", headers=auth_headers(), timeout=30).text
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith("vllm:request_success_total"))


def test_gateway_routes_around_a_killed_engine_and_back(model_dir, tmp_path):
    group = start_engines(model_dir("qwen2"), tmp_path / "logs", num_engines=2)
    pool = SupervisedPool(group, lambda: None, max_restarts=2)
    tok = AutoTokenizer.from_pretrained(model_dir("qwen2"))
    try:
        with Gateway(pool, tok, GatewayConfig(api_key="k", model_name="tiny", context_length=512)) as gw:
            client = openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0, timeout=300)

            def ask(sid: str) -> str:
                r = client.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": "2+2="}],
                    max_tokens=4,
                    extra_headers={"x-session-id": sid},
                )
                return r.choices[0].finish_reason

            on_first = [f"s{i}" for i in range(64) if group.pick(f"s{i}") is group.engines[0]][:4]
            killed = group.servers[0].proc.pid
            os.kill(killed, signal.SIGKILL)
            # the first request finds the server dead: it is answered by the other one (or re-issued there), and
            # the dead server is restarted meanwhile
            answers = [ask(on_first[0])]
            deadline = time.monotonic() + 60
            while not pool.down and time.monotonic() < deadline:
                time.sleep(0.05)
            assert pool.down == {0}, f"the dead server is not being restarted: {pool.counts}"
            other = served(group.urls()[1])
            answers += [ask(sid) for sid in on_first[1:]]  # while it restarts: the other server answers
            assert pool.down == {0} and served(group.urls()[1]) - other == len(on_first) - 1
            deadline = time.monotonic() + 300
            while (pool.down or group.dead()) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not group.dead() and not pool.down, "the killed server did not come back within 300 s"
            assert all(a in ("stop", "length") for a in answers), answers
            assert pool.counts["engine_restarts"] == 1, pool.counts
            assert group.servers[0].proc.pid != killed
            before = served(group.urls()[0])
            assert [ask(sid) for sid in on_first]
            assert served(group.urls()[0]) - before == len(on_first), "requests did not come back to the server"
    finally:
        # a server already gone must not hide the failure that brought us here behind a NoSuchProcess
        trees = [psutil.Process(s.proc.pid) for s in group.servers if psutil.pid_exists(s.proc.pid)]
        pids = [p.pid for t in trees for p in [t, *t.children(recursive=True)]]
        group.stop()
    left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes of the servers still alive after stop: {left}"


def test_a_server_killed_while_starting_is_started_again(model_dir, tmp_path, caplog):
    """engine.start_retries: a server SIGKILLed before it is healthy is started again instead of ending the run."""
    import logging
    import threading

    model = str(model_dir("llama"))  # no other test's server runs this model now: the victim is ours
    killed: list[int] = []

    def kill_first_server() -> None:
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for p in psutil.process_iter(["cmdline"]):
                cmd = p.info["cmdline"] or []
                if SERVER_MODULE in cmd and model in cmd:
                    time.sleep(2)  # well into its start-up, long before it is healthy
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_first_server, daemon=True)
    killer.start()
    with caplog.at_level(logging.WARNING, logger="engines.vllm.group"):
        group = start_engines(model_dir("llama"), tmp_path / "logs")
    try:
        killer.join(timeout=5)
        assert killed, "the server was never seen starting"
        assert group.servers[0].proc.pid != killed[0] and not group.dead()
        assert "killed while starting; starting again (1 of 2" in caplog.text
    finally:
        group.stop()
