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


def test_unknown_routes_answer_in_openai_shape(gw):
    r = httpx.post(gw.base_url + "/nope", headers=KEY, json={})
    assert r.status_code == 404 and "POST /v1/nope" in r.json()["error"]["message"], r.text
    r = httpx.get(gw.base_url + "/chat/completions", headers=KEY)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_content_parts_are_rendered_as_their_text(gw):
    parts = [{"type": "text", "text": "2+"}, {"type": "text", "text": "2="}]
    _, as_parts = post(gw, "/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": parts}]})
    _, as_text = post(gw, "/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "2+2="}]})
    assert as_parts["prompt_token_ids"] == as_text["prompt_token_ids"], (as_parts, as_text)
    image = [*parts, {"type": "image_url", "image_url": {"url": "x"}}]
    r, body = post(gw, "/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": image}]})
    assert r.status_code == 400 and "messages[0].content[2] is a 'image_url' part" in body["error"]["message"], body


def test_an_unset_max_tokens_is_fitted_to_the_context(gw):
    """As vLLM does: a long prompt without max_tokens gets what the context has left instead of a 400."""
    long = [{"role": "user", "content": "1+1= " * 80}]  # ~410 tokens: 256 more would not fit in 512
    r, body = post(gw, "/chat/completions", {"model": "tiny", "messages": long})
    assert r.status_code == 200, body
    used = body["usage"]["prompt_tokens"]
    assert used + gw.cfg.default_max_tokens > 512 and used + body["usage"]["completion_tokens"] <= 512, body
    r, body = post(gw, "/chat/completions", {"model": "tiny", "messages": long, "max_tokens": 512})
    assert r.status_code == 400 and body["error"]["code"] == "context_length_exceeded", body
