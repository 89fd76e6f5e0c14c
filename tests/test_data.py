import json

import pytest

from vime.data.buffer import DataBuffer, drop_uniform_reward
from vime.data.source import DataConfig, PromptSource
from vime.rewards.arithmetic import arithmetic_reward, make_problems
from vime.rewards.math import exact_match, extract_answer, math_reward
from vime.types import Sample


def source(tmp_path, n=10, **kw):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"q": f"p{i}", "a": str(i)}) + "\n" for i in range(n)))
    return PromptSource(DataConfig(path=str(p), prompt_key="q", label_key="a", **kw))


def test_source_keys_shuffle_and_epochs(tmp_path):
    s = source(tmp_path, seed=1, epochs=2)
    first = s.next_batch(10)
    assert sorted(r["prompt"] for r in first) == sorted(f"p{i}" for i in range(10))
    assert [r["prompt"] for r in first] != [f"p{i}" for i in range(10)]  # shuffled
    assert first[0]["label"] == first[0]["prompt"][1:]
    second = s.next_batch(15)
    assert len(second) == 10 and s.exhausted()  # two epochs only
    assert [r["prompt"] for r in second] != [r["prompt"] for r in first]  # a new order per epoch


def test_source_resumes_exactly(tmp_path):
    a = source(tmp_path, seed=5)
    a.next_batch(7)
    state = a.state_dict()
    expected = [r["prompt"] for r in a.next_batch(9)]
    b = source(tmp_path, seed=5)
    b.load_state_dict(state)
    assert [r["prompt"] for r in b.next_batch(9)] == expected


def test_source_errors_name_the_key_and_file(tmp_path):
    with pytest.raises(KeyError, match="set data.prompt_key"):
        source(tmp_path, seed=0).__class__(DataConfig(path=str(tmp_path / "d.jsonl"), prompt_key="question"))
    with pytest.raises(FileNotFoundError, match="data.path"):
        PromptSource(DataConfig(path=str(tmp_path / "missing.jsonl")))


def s(resp, label, reward=None):
    return Sample(prompt_ids=[1], response=resp, label=label, reward=reward)


def test_rewards():
    assert arithmetic_reward(s("12", "12")) == 1.0
    assert arithmetic_reward(s(" 12 ", "12")) == 1.0
    assert arithmetic_reward(s("12 and more", "12")) == 0.0
    assert arithmetic_reward(s("13", "12")) == 0.0
    assert math_reward(s("so the answer is \\boxed{\\frac{1}{2}} ok", "\\frac{1}{2}")) == 1.0
    assert math_reward(s("x = 3/6 so #### 1/2", "0.5")) == 1.0
    assert math_reward(s("we get 41, then 42", "42")) == 1.0
    assert math_reward(s("no number", "42")) == 0.0
    assert extract_answer("\\boxed{a{b}c}") == "a{b}c"
    assert exact_match(s(" Paris. ", "paris")) == 1.0
    probs = make_problems(50, seed=0)
    assert probs == make_problems(50, seed=0)
    assert all(int(p["label"]) == sum(map(int, p["prompt"][:-1].split("+"))) for p in probs)


def test_buffer_filters_and_state(tmp_path):
    buf = DataBuffer([drop_uniform_reward])
    same = [s("a", "1", 0.0), s("b", "1", 0.0)]
    mixed = [s("a", "1", 0.0), s("b", "1", 1.0)]
    assert buf.add([same, mixed]) == 1
    assert buf.stats == {"groups_in": 2, "groups_dropped": 1}
    other = DataBuffer()
    other.load_state_dict(buf.state_dict())
    assert other.pop_groups() == [mixed] and len(other) == 0


def test_sft_conversations_are_tokenised_as_the_gateway_builds_agent_prompts(repo_root, model_dir):
    """A tool-call trace for the warm start: mask 1 on exactly the assistant turns (through their end-of-turn
    token), and the tokens around them are the ones the gateway puts around sampled tokens at rollout time
    (first prompt, then each continuation encoded on its own), so what SFT teaches is what RL will see."""
    from transformers import AutoTokenizer

    from vime.data.sft import ConversationSource, conversation_sample, read_conversations
    from vime.gateway.sessions import PromptBuilder

    tok = AutoTokenizer.from_pretrained(model_dir("qwen2"))
    row = read_conversations(repo_root / "examples" / "tool_calc" / "sft.jsonl")[0]
    msgs, tools = row["messages"], row["tools"]
    s = conversation_sample(msgs, tools, tok)
    b = PromptBuilder(tok)
    call = b.encode(b.render(msgs[:2], tools, generation_prompt=False)[len(b.render(msgs[:1], tools)) :])
    call = call[: call.index(tok.eos_token_id) + 1]
    answer = [*b.encode(msgs[3]["content"]), tok.eos_token_id]
    middle = b.encode(b.continuation(msgs[:2], msgs[2:3], tools))
    assert s.prompt_ids == b.first_prompt(msgs[:1], tools)
    assert s.response_ids == call + middle + answer
    assert s.loss_mask == [1] * len(call) + [0] * len(middle) + [1] * len(answer)
    assert "<tool_call>" in tok.decode(call, skip_special_tokens=False)
    batch = ConversationSource(repo_root / "examples" / "tool_calc" / "sft.jsonl", tok, seed=1).next_batch(3)
    assert len(batch) == 3 and all(1 in x.loss_mask for x in batch)
    with pytest.raises(FileNotFoundError, match="loop.sft_path"):
        read_conversations(repo_root / "nope.jsonl")
