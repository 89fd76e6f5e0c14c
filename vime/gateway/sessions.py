"""Exact token capture per session.

Each turn's prompt is the previous turn's exact token ids + the tokens the engine sampled + only the newly added
messages, tokenised on their own. History is never re-tokenised, so what the trainer sees is exactly what the
engine sampled (re-tokenising "12" sampled as "1","2" would silently change the trajectory).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from vime.types import Sample, Status


@dataclass
class Turn:
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    weight_versions: list[str]
    text: str
    engine_url: str = ""


@dataclass
class Session:
    id: str
    messages: list[dict[str, Any]] = field(default_factory=list)  # the conversation as the client sent it
    ids: list[int] = field(default_factory=list)  # exact token history (prompt + sampled)
    mask: list[int] = field(default_factory=list)  # 1 = sampled by the policy
    logprobs: list[float] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    updated: float = field(default_factory=time.time)


def _as_dict(m: Any) -> dict[str, Any]:
    return m if isinstance(m, dict) else dict(m)


class PromptBuilder:
    """Renders the chat template, but only ever for messages that are new to the session."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.eos_text = tokenizer.decode([self.eos]) if self.eos is not None else None

    def render(self, messages: list[dict[str, Any]], tools: Any = None, generation_prompt: bool = True) -> str:
        return str(
            self.tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False)
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def first_prompt(self, messages: list[dict[str, Any]], tools: Any = None) -> list[int]:
        return self.encode(self.render(messages, tools))

    def continuation(self, seen: list[dict[str, Any]], new: list[dict[str, Any]], tools: Any = None) -> str:
        """The template text that follows the last assistant turn when `new` messages are appended: whatever
        the template puts after the assistant's end-of-turn token, then the new messages, then the generation
        prompt."""
        before = self.render(seen, tools, generation_prompt=False)
        after = self.render(seen + new, tools, generation_prompt=True)
        if not after.startswith(before):
            # Templates that rewrite earlier turns: fall back to the tail after the last end-of-turn token.
            cut = before.rfind(self.eos_text) + len(self.eos_text) if self.eos_text else len(before)
            return after[cut:] if after[:cut] == before[:cut] else after[len(before) :]
        eos = self.eos_text
        tail = before[before.rfind(eos) + len(eos) :] if eos and eos in before else ""
        return tail + after[len(before) :]


class SessionStore:
    def __init__(self, tokenizer: Any):
        self.builder = PromptBuilder(tokenizer)
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()

    def get(self, sid: str) -> Session:
        with self.lock:
            return self.sessions.setdefault(sid, Session(id=sid))

    def prompt_for(self, s: Session, messages: list[dict[str, Any]], tools: Any = None) -> list[int]:
        """Token ids for this request: the session's exact history + only the messages it has not seen.
        A request whose history does not extend the session's (the client rewrote earlier turns) starts a
        fresh token history."""
        messages = [_as_dict(m) for m in messages]
        n = len(s.messages)
        if s.turns and n and len(messages) > n and _same(messages[:n], s.messages):
            ids = list(s.ids)
            if ids and ids[-1] != self.builder.eos:
                ids.append(self.builder.eos)  # the turn was cut (length): close it as the template would
            delta = self.builder.encode(self.builder.continuation(s.messages, messages[n:], tools))
            return ids + delta
        s.ids, s.mask, s.logprobs, s.versions, s.turns = [], [], [], [], []
        return self.builder.first_prompt(messages, tools)

    def record(
        self,
        s: Session,
        messages: list[dict[str, Any]],
        prompt_ids: list[int],
        turn: Turn,
        assistant_message: dict[str, Any],
    ) -> None:
        with self.lock:
            new = prompt_ids[len(s.ids) :]
            s.ids = list(prompt_ids) + list(turn.response_ids)
            s.mask += [0] * len(new) + [1] * len(turn.response_ids)
            s.logprobs += [0.0] * len(new) + list(turn.logprobs)
            s.versions += [""] * len(new) + list(turn.weight_versions or [""] * len(turn.response_ids))
            s.turns.append(turn)
            s.messages = [_as_dict(m) for m in messages] + [assistant_message]
            s.updated = time.time()

    def to_sample(self, sid: str, **kw: Any) -> Sample:
        """The whole session as one Sample: the first prompt, then everything after it with a loss mask
        (model tokens 1; user/tool tokens 0)."""
        s = self.sessions[sid]
        if not s.turns:
            raise KeyError(f"session {sid!r} has no completed turn")
        p = len(s.turns[0].prompt_ids)
        return Sample(
            prompt_ids=s.ids[:p],
            response_ids=s.ids[p:],
            logprobs=s.logprobs[p:],
            loss_mask=s.mask[p:],
            weight_versions=s.versions[p:] if any(s.versions[p:]) else [],
            status=Status.COMPLETED if s.turns[-1].finish_reason == "stop" else Status.TRUNCATED,
            group_id=sid,
            prompt=s.messages[: len(s.messages) - 2 * len(s.turns) + 1] or s.messages[:1],
            response=s.turns[-1].text,
            metadata={"turns": len(s.turns), "messages": s.messages, **kw},
        )

    def pop(self, sid: str) -> Session | None:
        with self.lock:
            return self.sessions.pop(sid, None)


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    keys = ("role", "content", "tool_call_id")
    return all(all((x.get(k) or "") == (y.get(k) or "") for k in keys) for x, y in zip(a, b))
