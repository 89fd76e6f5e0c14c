"""The P/D request protocol done by hand (the test oracle for vllm-router; not a product path):
1. the prefill server runs the prompt with max_tokens=1 and returns `kv_transfer_params`;
2. the decode server gets the original request plus those params and pulls the KV over the connector."""

from __future__ import annotations

from typing import Any

import httpx

from vime.secret import auth_headers

ENGINE_HTTP = httpx.Client(headers=auth_headers(), timeout=30)  # the run's secret; 30 s: a loaded server is slow


def pd_completion(prefill_url: str, decode_url: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    first = {
        **body,
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        },
    }
    r = ENGINE_HTTP.post(prefill_url + "/v1/completions", json=first, timeout=timeout)
    r.raise_for_status()
    params = r.json()["kv_transfer_params"]
    r = ENGINE_HTTP.post(decode_url + "/v1/completions", json={**body, "kv_transfer_params": params}, timeout=timeout)
    r.raise_for_status()
    return r.json()
