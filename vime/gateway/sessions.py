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
    temperature: float = 1.0  # what the client sampled at: the trainer must score at the same (agent rollouts check)


@dataclass
class Branch:
    """One line of a session's conversation: exact token history, and where each turn ended."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # as the client sent them, with our replies
    ids: list[int] = field(default_factory=list)  # exact token history (prompt + sampled)
    mask: list[int] = field(default_factory=list)  # 1 = sampled by the policy on this branch
    logprobs: list[float] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    ends: list[tuple[int, int]] = field(default_factory=list)  # (messages, tokens) after each turn
    prompt_len: int = 0  # tokens of the first prompt
    first_messages: list[dict[str, Any]] = field(default_factory=list)
    parent: int | None = None  # the branch this forked from: the shared prefix is context here (trained there)
    exact: bool = True  # False: its first prompt re-rendered assistant turns this session never recorded
    updated: float = field(default_factory=time.time)


@dataclass
class Cursor:
    """Where a request's prompt continues a session: branch and turn (None: a new branch), with its ids."""

    ids: list[int]
    branch: int | None = None
    turn: int = -1
    exact: bool = True


@dataclass
class Session:
    """A tree of branches keyed by exact token prefixes: a request that continues a recorded turn extends (or
    forks from) it; one whose history matches nothing recorded starts a new branch. So a framework that rewrites
    its history, or two conversations sharing one session id, never corrupt each other's tokens."""

    id: str
    branches: list[Branch] = field(default_factory=list)
    updated: float = field(default_factory=time.time)

    @property
    def latest(self) -> Branch | None:
        return max(self.branches, key=lambda b: b.updated, default=None)

    @property
    def turns(self) -> list[Turn]:
        """The turns of the branch updated last (a linear conversation's only branch)."""
        b = self.latest
        return b.turns if b else []


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
    def __init__(self, tokenizer: Any, ttl_s: float = 3600.0, max_sessions: int = 10_000):
        self.builder = PromptBuilder(tokenizer)
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.ttl_s, self.max_sessions = ttl_s, max_sessions
        self.counts: dict[str, int] = {}  # forks, history rewrites, evictions: taken per step by the loop

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def get(self, sid: str) -> Session:
        with self.lock:
            self._evict(time.time(), room=sid not in self.sessions)
            return self.sessions.setdefault(sid, Session(id=sid))

    def _evict(self, now: float, room: bool) -> None:
        """Sessions idle past the TTL go, then the least recently used past the cap (`vime serve` runs for days);
        `room`: one more is about to be added."""
        stale = [k for k, s in self.sessions.items() if now - s.updated > self.ttl_s]
        over = len(self.sessions) - len(stale) - self.max_sessions + int(room)
        if over > 0:
            live = sorted((s.updated, k) for k, s in self.sessions.items() if k not in stale)
            stale += [k for _, k in live[:over]]
        for k in stale:
            del self.sessions[k]
            self.count("sessions_evicted")

    def prompt_for(self, s: Session, messages: list[dict[str, Any]], tools: Any = None) -> Cursor:
        """Token ids for this request: the exact history of the recorded turn its messages continue (the longest
        such prefix over all branches) + only the messages that turn has not seen. No match: a fresh prompt, on a
        new branch; if its history holds assistant turns, those are re-rendered text, not the sampled tokens, and
        the branch is marked inexact (counted as a history rewrite)."""
        messages = [_as_dict(m) for m in messages]
        with self.lock:
            best: tuple[int, int, int] | None = None
            for bi, b in enumerate(s.branches):
                for k in range(len(b.ends) - 1, -1, -1):
                    n = b.ends[k][0]
                    if len(messages) > n and _same(messages[:n], b.messages[:n]):
                        if best is None or n > best[0]:
                            best = (n, bi, k)
                        break  # this branch's earlier turns are shorter prefixes
            if best is not None:
                n, bi, k = best
                b = s.branches[bi]
                ids, seen, exact = b.ids[: b.ends[k][1]], b.messages[:n], b.exact
        if best is None:  # (a first request's own few-shot assistant turns are no rewrite: nothing was recorded)
            exact = not (s.branches and any(m.get("role") == "assistant" for m in messages))
            return Cursor(self.builder.first_prompt(messages, tools), None, -1, exact)
        if ids and ids[-1] != self.builder.eos:
            ids = [*ids, self.builder.eos]  # the turn was cut (length): close it as the template would
        delta = self.builder.encode(self.builder.continuation(seen, messages[n:], tools))
        return Cursor(ids + delta, bi, k, exact)

    def record(
        self, s: Session, cursor: Cursor, messages: list[dict[str, Any]], turn: Turn, assistant_message: dict[str, Any]
    ) -> None:
        with self.lock:
            messages = [_as_dict(m) for m in messages]
            b = self._branch_for(s, cursor, messages)
            new = cursor.ids[len(b.ids) :]
            b.ids = list(cursor.ids) + list(turn.response_ids)
            b.mask += [0] * len(new) + [1] * len(turn.response_ids)
            b.logprobs += [0.0] * len(new) + list(turn.logprobs)
            b.versions += [""] * len(new) + list(turn.weight_versions or [""] * len(turn.response_ids))
            b.turns.append(turn)
            b.messages = [*messages, assistant_message]
            b.ends.append((len(b.messages), len(b.ids)))
            b.updated = s.updated = time.time()

    def _branch_for(self, s: Session, cursor: Cursor, messages: list[dict[str, Any]]) -> Branch:
        """The branch a finished turn lands on: the one it continued, if that still ends where the request found
        it; a fork of it otherwise (a rewind, or another request extended it meanwhile); or a new one."""
        if cursor.branch is None:
            if not cursor.exact:
                self.count("history_rewrites")
            s.branches.append(Branch(prompt_len=len(cursor.ids), first_messages=messages, exact=cursor.exact))
            return s.branches[-1]
        b = s.branches[cursor.branch]
        if cursor.turn == len(b.turns) - 1:
            return b
        self.count("forks")
        n, tok = b.ends[cursor.turn]
        fork = Branch(
            messages=b.messages[:n],
            ids=b.ids[:tok],
            mask=[0] * tok,  # the shared prefix is trained once, on the branch it was sampled on
            logprobs=b.logprobs[:tok],
            versions=b.versions[:tok],
            prompt_len=b.prompt_len,
            first_messages=b.first_messages,
            parent=cursor.branch,
            exact=b.exact,
        )
        s.branches.append(fork)
        return fork

    def to_samples(self, sid: str, **kw: Any) -> list[Sample]:
        return self.samples_of(self.sessions[sid], **kw)

    def samples_of(self, s: Session, **kw: Any) -> list[Sample]:
        """Each branch with a turn as one Sample, the branch updated last at the end: its first prompt, then
        everything after it with a loss mask (tokens sampled on this branch 1; user/tool tokens, and a fork's
        shared prefix, 0)."""
        branches = sorted(((i, b) for i, b in enumerate(s.branches) if b.turns), key=lambda ib: ib[1].updated)
        if not branches:
            raise KeyError(f"session {s.id!r} has no completed turn")
        return [self._sample(s.id, i, b, kw) for i, b in branches]

    def to_sample(self, sid: str, **kw: Any) -> Sample:
        """The branch updated last (a linear conversation's only one)."""
        return self.to_samples(sid, **kw)[-1]

    def _sample(self, sid: str, index: int, b: Branch, kw: dict[str, Any]) -> Sample:
        p = b.prompt_len
        return Sample(
            prompt_ids=b.ids[:p],
            response_ids=b.ids[p:],
            logprobs=b.logprobs[p:],
            loss_mask=b.mask[p:],
            weight_versions=b.versions[p:] if any(b.versions[p:]) else [],
            status=Status.COMPLETED if b.turns[-1].finish_reason == "stop" else Status.TRUNCATED,
            group_id=sid,
            prompt=b.first_messages,
            response=b.turns[-1].text,
            metadata={
                "turns": len(b.turns),
                "branch": index,
                "forked_from": b.parent,
                "exact_prefix": b.exact,
                "temperatures": [t.temperature for t in b.turns],
                "messages": b.messages,
                **kw,
            },
        )

    def take_counts(self) -> dict[str, float]:
        with self.lock:
            out = {f"gateway/{k}": float(v) for k, v in self.counts.items()}
            self.counts.clear()
        return out

    def pop(self, sid: str) -> Session | None:
        with self.lock:
            return self.sessions.pop(sid, None)


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    keys = ("role", "content", "tool_call_id")
    return all(all((x.get(k) or "") == (y.get(k) or "") for k in keys) for x, y in zip(a, b))
