"""Supervised warm start on whole conversations (`loop.sft_path`): agent traces with tool calls and tool results,
so a tiny model can learn the call format before RL teaches it when to call.

Each conversation is tokenised the way the gateway builds an agent's prompts at rollout time: the first prompt as
the template renders it, then each assistant turn and each continuation (the template text the next messages add)
encoded on their own. So the tokens learned here are the tokens the gateway will put around what the model
samples. The loss mask is 1 on each assistant turn up to and including its end-of-turn token: what the policy
samples; 0 on everything the template, the user or a tool wrote.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from vime.types import Sample


def read_conversations(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"loop.sft_path={str(path)!r} does not exist")
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise ValueError(f"{p}:{i}: a conversation is {{'messages': [...], 'tools': [...]}} (tools optional)")
        if not any(m.get("role") == "assistant" for m in row["messages"]):
            raise ValueError(f"{p}:{i}: no assistant message to learn from")
        rows.append(row)
    return rows


def conversation_sample(messages: list[dict[str, Any]], tools: Any, tokenizer: Any) -> Sample:
    eos = tokenizer.eos_token_id

    def render(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
        return str(
            tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=generation_prompt, tokenize=False)
        )

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = render(messages[:first], True)
    prompt = encode(text)
    ids: list[int] = []
    mask: list[int] = []
    for i in range(first, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        if i > first:  # the template text the messages since the last assistant turn add
            piece = encode(before[len(text) :])
            ids, mask = ids + piece, mask + [0] * len(piece)
        after = render(messages[: i + 1], False)
        turn = encode(after[len(before) :])
        if eos in turn:  # the policy stops at its end-of-turn token; what the template puts after it is context
            turn = turn[: turn.index(eos) + 1]
        ids, mask = ids + turn, mask + [1] * len(turn)
        text = before + tokenizer.decode(turn, skip_special_tokens=False)
    return Sample(prompt_ids=prompt, response_ids=ids, logprobs=[0.0] * len(ids), loss_mask=mask)


class ConversationSource:
    """Conversations in a seeded random order, cycling: the warm start draws `n` a step."""

    def __init__(self, path: str | Path, tokenizer: Any, seed: int):
        self.rows = read_conversations(path)
        self.tokenizer, self.rng = tokenizer, random.Random(seed)
        self.order: list[int] = []

    def next_batch(self, n: int) -> list[Sample]:
        out = []
        for _ in range(n):
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            row = self.rows[self.order.pop()]
            out.append(conversation_sample(row["messages"], row.get("tools"), self.tokenizer))
        return out
