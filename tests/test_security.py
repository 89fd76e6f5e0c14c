"""Engines vime starts refuse every route but liveness and metrics to a local process that lacks the run's secret
(vLLM's own --api-key would leave /pause, /collective_rpc, /sleep and the weight-transfer routes open)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from vime.secret import ENV, auth_headers

# (method, path, json body): pause/update/sleep an engine, run code in it, or generate bypassing the gateway
ADMIN = [
    ("POST", "/pause", None),
    ("POST", "/sleep", None),
    ("POST", "/collective_rpc", {"method": "vime_refresh_tied_lm_head"}),
    ("POST", "/vime/push", {"update": {}, "pause": "abort"}),  # vime's own push route pauses and loads too
    ("POST", "/vime/workers", {"method": "vime_weight_sums", "kwargs": {"names": []}}),  # and runs worker calls
    ("POST", "/init_weight_transfer_engine", {"init_info": {}}),
    ("POST", "/start_weight_update", None),
    ("POST", "/reset_prefix_cache", None),
    ("POST", "/v1/completions", {"model": "m", "prompt": [1, 2], "max_tokens": 1}),
    ("POST", "/inference/v1/generate", {"token_ids": [1, 2], "sampling_params": {"max_tokens": 1}}),
    ("GET", "/v1/models", None),
    ("GET", "/weight_info", None),
]

# another local process: a fresh interpreter with no secret in its environment, trying each route
INTRUDER = """
import json, sys, httpx
url, routes, header = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = [[p, httpx.request(m, url + p, json=b, headers=header, timeout=30).status_code] for m, p, b in routes]
out.append(["/health", httpx.get(url + "/health", timeout=30).status_code])
print(json.dumps(out))
"""


def intrude(url: str, header: dict[str, str]) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    r = subprocess.run(
        [sys.executable, "-c", INTRUDER, url, json.dumps(ADMIN), json.dumps(header)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(json.loads(r.stdout))


@pytest.mark.parametrize("header", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}])
def test_process_without_the_secret_cannot_pause_or_update_an_engine(qwen2_engines, model_dir, header):
    url = qwen2_engines.urls()[0]
    codes = intrude(url, header)
    assert codes.pop("/health") == 200, codes
    assert codes == {p: 401 for _, p, _ in ADMIN}, codes
    # the engine was neither paused nor changed: vime's own client (holding the secret) still generates
    r = httpx.post(
        url + "/v1/completions",
        json={"model": str(model_dir("qwen2")), "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0.0},
        headers=auth_headers(),
        timeout=60,
    )
    assert r.status_code == 200, r.text[:500]
    assert httpx.get(url + "/weight_info", headers=auth_headers(), timeout=30).status_code == 200


def test_the_secret_never_appears_on_a_command_line(qwen2_engines):
    """`ps` shows every user each process's arguments: the secret travels by environment only."""
    import psutil

    secret = auth_headers()["Authorization"].split()[1]
    leaks = [p.pid for p in psutil.process_iter(["cmdline"]) if secret in " ".join(p.info["cmdline"] or [])]
    assert leaks == []


def test_sglang_launcher_keys_survive_a_secret_that_starts_with_a_dash():
    """A url-safe secret starts with "-" one time in 32; given as `--api-key <secret>`, argparse took it for a flag
    and SGLang refused to start (seen on an H100). Parsed by the fake SGLang's argparse, as the real one does."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "from engines.sglang.launch import key_flags\n"
        "from sglang.srt.server_args import prepare_server_args\n"
        "a = prepare_server_args(['--model-path', 'm', *key_flags('-Xy_z')])\n"
        "print(a.api_key, a.admin_api_key)\n"
    )
    path = os.pathsep.join([os.path.join(root, "tests", "fake_sglang"), root])
    env = {**os.environ, "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.split() == ["-Xy_z", "-Xy_z"], r.stderr[-2000:]
