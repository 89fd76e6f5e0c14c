"""Data that crosses a process boundary: what engines return and what the buffer and trainer consume.

Everything here is a plain dataclass with a lossless JSON form, so samples can go to JSONL, through Ray and
into checkpoints without a custom serialiser.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class Status(str, Enum):
    COMPLETED = "completed"  # the engine stopped on EOS or a stop string
    TRUNCATED = "truncated"  # hit max_tokens / context length
    ABORTED = "aborted"  # cut by a pause(abort) or an engine restart; may be resumed as a partial rollout


@dataclass
class SamplingParams:
    """The engine-agnostic subset every engine understands; anything else goes in `extra` verbatim."""

    n: int = 1
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None  # decode under this JSON schema (the engine's structured output)
    routed_experts: bool = False  # MoE: return the experts the engine routed every token to (routing replay, R3)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Completion:
    """One sampled continuation exactly as the engine produced it (never re-tokenised)."""

    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token, as the engine reports it
    finish_reason: str  # "stop" | "length" | "abort"
    text: str = ""
    weight_versions: list[str] = field(default_factory=list)  # one per token; empty if the engine has none
    # MoE, when asked for: the experts of every position the engine computed, prompt and response, all but the
    # last token (nothing reads its routing): [position][layer][k], every layer as the engines report them (a
    # dense layer's rows mean nothing)
    routed_experts: list[list[list[int]]] | None = None

    @property
    def status(self) -> Status:
        return {"stop": Status.COMPLETED, "length": Status.TRUNCATED}.get(self.finish_reason, Status.ABORTED)


@dataclass
class Sample:
    """One trajectory: the unit the buffer stores and the trainer learns from.

    `loss_mask` has one entry per response token: 1 for tokens the policy sampled, 0 for tokens inserted by the
    environment (user or tool turns in a multi-turn rollout), so those are conditioned on but not trained on.
    """

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    reward: float | None = None
    advantage: float = 0.0  # set by the algorithm from the group (e.g. GRPO), broadcast over tokens
    token_advantages: list[float] = field(default_factory=list)  # one per response token, when they differ
    status: Status = Status.COMPLETED
    weight_versions: list[str] = field(default_factory=list)
    group_id: str = ""
    index: int = 0  # position inside its group
    prompt: Any = None  # the original prompt (text or messages), for logging and rewards
    label: Any = None  # the ground truth the reward function checks against
    response: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    routed_experts: list[list[list[int]]] | None = None  # the engine's, as `Completion.routed_experts`

    def __post_init__(self) -> None:
        self.status = Status(self.status)
        if not self.loss_mask:
            self.loss_mask = [1] * len(self.response_ids)
        self.validate()

    def validate(self) -> None:
        n = len(self.response_ids)
        for name in ("logprobs", "loss_mask"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Sample.{name} has {len(getattr(self, name))} entries for {n} response tokens")
        if self.weight_versions and len(self.weight_versions) != n:
            raise ValueError(f"Sample.weight_versions has {len(self.weight_versions)} entries for {n} tokens")
        positions = len(self.prompt_ids) + n - 1
        if self.routed_experts is not None and len(self.routed_experts) != positions:
            raise ValueError(f"Sample.routed_experts covers {len(self.routed_experts)} positions, not {positions}")

    @classmethod
    def from_completion(cls, prompt_ids: list[int], c: Completion, **kw: Any) -> Sample:
        return cls(
            prompt_ids=list(prompt_ids),
            response_ids=list(c.token_ids),
            logprobs=list(c.logprobs),
            status=c.status,
            weight_versions=list(c.weight_versions),
            response=c.text,
            routed_experts=c.routed_experts,
            **kw,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        return cls(**d)


Group = list[Sample]  # the n samples drawn for one prompt; advantages are computed within a group


def write_jsonl(samples: Iterable[Sample], path: str | Path) -> int:
    n = 0
    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps(s.to_dict()) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[Sample]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield Sample.from_dict(json.loads(line))
