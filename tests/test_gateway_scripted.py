"""The gateway's parsing and streaming against a scripted engine: a tiny random model never samples a well-formed
tool call, and a real engine under load may merge its stream into one piece, so what is pinned here piece by piece
needs an engine that answers the same way every time."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from vime.gateway.config import GatewayConfig
from vime.gateway.server import Gateway


class ScriptedEngine:
    """Stands in for a model that has learned to call tools (the tiny random model never samples a well-formed
    call): it answers every request with the same token ids, the way an engine answers; streamed, a token at a
    time, and failing after `fail_after` tokens if that is set."""

    base_url = "http://scripted"

    def __init__(self, ids, fail_after=None):
        self.ids, self.fail_after = ids, fail_after

    async def healthy(self):
        return True

    async def generate(self, prompts, params, session=None):
        from vime.types import Completion

        return [[Completion(list(self.ids), [-0.5] * len(self.ids), "stop") for _ in range(params.n)] for _ in prompts]

    async def stream(self, prompt, params, session=None):
        from vime.types import Completion

        for k in range(1, len(self.ids) + 1):
            if k == self.fail_after:
                raise RuntimeError("engine died mid-stream")
            yield Completion(self.ids[:k], [-0.5] * k, "")
        yield Completion(list(self.ids), [-0.5] * len(self.ids), "stop")


class One:
    def __init__(self, engine):
        self.engines = (engine,)

    def pick(self, key=None):
        return self.engines[0]


def test_tool_call_markers_reach_the_parser_though_the_tokenizer_marks_them_special(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir("qwen2"))
    call = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    ids = [*tok.encode(call, add_special_tokens=False), tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.convert_tokens_to_ids("<tool_call>") in tok.all_special_ids  # what used to hide the call

    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    with Gateway(One(ScriptedEngine(ids)), tok, GatewayConfig(api_key="k", model_name="tiny")) as gw:
        c = openai.OpenAI(base_url=gw.base_url, api_key="k")
        msgs = [{"role": "user", "content": "add 1 and 2"}]
        r = c.chat.completions.create(model="tiny", messages=msgs, tools=tools, extra_headers={"x-session-id": "t"})
        (tc,) = r.choices[0].message.tool_calls
        assert (tc.function.name, tc.function.arguments, r.choices[0].finish_reason) == (
            "add",
            '{"a": 1, "b": 2}',
            "tool_calls",
        )
        assert gw.store.sessions["t"].turns[0].response_ids == ids  # recorded as sampled, markers included
        plain = c.chat.completions.create(model="tiny", messages=msgs)  # no tools asked: special tokens skipped
        assert "<tool_call>" not in plain.choices[0].message.content


def test_a_streamed_tool_call_never_leaks_into_content(model_dir):
    """Text before a call streams; from the call's opening marker on nothing goes out as content, and the call
    arrives parsed, as in an unstreamed answer. The Responses stream does the same with its items."""
    tok = AutoTokenizer.from_pretrained(model_dir("qwen2"))
    text = 'Let me compute that. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    ids = [*tok.encode(text, add_special_tokens=False), tok.convert_tokens_to_ids("<|im_end|>")]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    with Gateway(One(ScriptedEngine(ids)), tok, GatewayConfig(api_key="k", model_name="tiny")) as gw:
        c = openai.OpenAI(base_url=gw.base_url, api_key="k")
        msgs = [{"role": "user", "content": "add 1 and 2"}]
        chunks = list(c.chat.completions.create(model="tiny", messages=msgs, tools=tools, stream=True))
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        content = [d.content for d in deltas if d.content]
        assert "".join(content) == "Let me compute that." and len(content) > 1, content
        (calls,) = [d.tool_calls for d in deltas if d.tool_calls]
        assert (calls[0].function.name, calls[0].function.arguments) == ("add", '{"a": 1, "b": 2}')
        assert chunks[-2].choices[0].finish_reason == "tool_calls"
        rtools = [{"type": "function", "name": "add", "parameters": {"type": "object"}}]
        events = list(c.responses.create(model="tiny", input="add 1 and 2", tools=rtools, stream=True))
        text_deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert "".join(text_deltas) == "Let me compute that." and len(text_deltas) > 1, text_deltas
        final = events[-1].response
        assert [o.type for o in final.output] == ["message", "function_call"], final.output
        assert final.output[1].arguments == '{"a": 1, "b": 2}'


def test_completions_stream_a_piece_per_engine_chunk(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir("qwen2"))
    ids = tok.encode("one two three four", add_special_tokens=False)
    with Gateway(One(ScriptedEngine(ids)), tok, GatewayConfig(api_key="k", model_name="tiny")) as gw:
        c = openai.OpenAI(base_url=gw.base_url, api_key="k")
        pieces = list(c.completions.create(model="tiny", prompt="x", max_tokens=8, logprobs=0, stream=True))
        assert [p.choices[0].text for p in pieces] == [tok.decode([t]) for t in ids] + [""], pieces
        assert sum(len(p.choices[0].logprobs.token_logprobs) for p in pieces) == len(ids)
        assert (pieces[-1].choices[0].finish_reason, pieces[-1].choices[0].model_extra["token_ids"]) == ("stop", ids)


def test_an_engine_failing_mid_stream_is_an_error_event_and_counted(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir("qwen2"))
    ids = tok.encode("one two three four five six", add_special_tokens=False)
    with Gateway(One(ScriptedEngine(ids, fail_after=4)), tok, GatewayConfig(api_key="k", model_name="tiny")) as gw:
        c = openai.OpenAI(base_url=gw.base_url, api_key="k")
        got = []
        with pytest.raises(openai.APIError, match="engine died mid-stream"):
            for ch in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], stream=True):
                got.append(ch)
        assert any(ch.choices and ch.choices[0].delta.content for ch in got)  # some text had gone out before
        with pytest.raises(openai.APIError, match="engine died mid-stream"):
            list(c.responses.create(model="tiny", input="x", stream=True))
        assert gw.take_counts()["gateway/http_5xx"] == 2
