"""Bad request bodies at the gateway get OpenAI-shaped 4xx answers that name the field, before any engine is
asked (the shared real engines stand behind it)."""

from __future__ import annotations

import httpx
import pytest
from transformers import AutoTokenizer

from vime.gateway.config import GatewayConfig
from vime.gateway.server import Gateway

pytestmark = pytest.mark.slow

KEY = {"Authorization": "Bearer k"}


@pytest.fixture(scope="module")
def gw(qwen2_engines, model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir("qwen2"))
    cfg = GatewayConfig(api_key="k", model_name="tiny", context_length=512, max_body_bytes=4096)
    with Gateway(qwen2_engines, tok, cfg) as g:
        yield g


def post(gw, route, body):
    r = httpx.post(gw.base_url + route, headers=KEY, json=body, timeout=60)
    return r, r.json()


@pytest.mark.parametrize(
    "messages, needle",
    [
        ([{"role": "wizard", "content": "hi"}], "messages[0].role must be one of"),
        ([{"content": "hi"}], "messages[0].role must be one of"),
        ([{"role": "user", "content": "hi"}, {"role": "user"}], "messages[1] (user) has no content"),
        ([{"role": "user", "content": 5}], "messages[0].content must be a string"),
    ],
)
def test_chat_messages_are_checked(gw, messages, needle):
    r, body = post(gw, "/chat/completions", {"model": "tiny", "messages": messages})
    assert r.status_code == 400, body
    assert needle in body["error"]["message"] and body["error"]["param"] == "messages", body


@pytest.mark.parametrize("prompt", ["", [], [-1], [3, 10**9], [[1, 2], []]])
def test_completion_prompts_are_checked(gw, prompt):
    r, body = post(gw, "/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 400, body
    assert body["error"]["param"] == "prompt" and body["error"]["type"] == "invalid_request_error", body


def test_oversized_body_is_413(gw):
    r, body = post(gw, "/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 10_000}]})
    assert r.status_code == 413 and "gateway.max_body_bytes=4096" in body["error"]["message"], body


def test_valid_requests_still_served(gw):
    r, body = post(gw, "/completions", {"model": "tiny", "prompt": [1, 40, 41], "max_tokens": 2})
    assert r.status_code == 200 and len(body["choices"][0]["token_ids"]) >= 1, body
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="}]
    r, body = post(gw, "/chat/completions", {"model": "tiny", "messages": msgs, "max_tokens": 2})
    assert r.status_code == 200, body
