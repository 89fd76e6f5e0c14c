"""The algorithm section of a recipe: how groups become a training batch and which loss trains on it.

`name` is a preset: it fills the estimator and aggregation a recipe leaves unset (GRPO: std-normalised group
advantages, token-mean; Dr. GRPO: mean-centred, a constant-length normaliser; DAPO: GRPO's advantages with
clip-higher and token-mean). Anything set explicitly wins.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vime.types import Group, Sample

# kept here, not imported from the tensor modules: loading a recipe must not import torch
MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KLEstimator = Literal["k1", "k2", "k3"]

PRESETS: dict[str, dict[str, str]] = {
    "grpo": {"estimator": "grpo", "aggregation": "token-mean"},
    "dr_grpo": {"estimator": "dr_grpo", "aggregation": "seq-mean-token-sum-norm"},
    "dapo": {"estimator": "grpo", "aggregation": "token-mean"},
    "rloo": {"estimator": "rloo", "aggregation": "token-mean"},
    "reinforce_plus_plus": {"estimator": "reinforce_plus_plus", "aggregation": "token-mean"},
    "reinforce_plus_plus_baseline": {"estimator": "reinforce_plus_plus_baseline", "aggregation": "token-mean"},
    "gspo": {"estimator": "grpo", "aggregation": "seq-mean-token-mean"},
    "ppo": {"estimator": "gae", "aggregation": "token-mean"},
}


class TISConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: Literal["token", "sequence"] = "token"
    cap: float = Field(default=2.0, gt=0, description="largest importance weight")


class MISConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: Literal["token", "sequence", "geometric"] = "token"
    low: float = Field(default=0.5, ge=0)
    high: float = Field(default=2.0, gt=0)


class AlgorithmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal[
        "grpo", "dr_grpo", "dapo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "gspo", "ppo"
    ] = "grpo"
    estimator: str | None = Field(default=None, description="advantage estimator name or 'pkg.module:fn'")
    std: Literal["unbiased", "population", "none"] = Field(
        default="unbiased", description="grpo's group std: unbiased (n-1, as verl and slime) or population (n)"
    )
    gamma: float = Field(default=1.0, ge=0, le=1, description="discount (reinforce_plus_plus*, gae)")
    lam: float = Field(default=0.95, ge=0, le=1, description="GAE lambda")
    whiten_advantages: bool = Field(default=True, description="gae: whiten advantages over the batch (as verl)")
    aggregation: str | None = Field(default=None, description=f"one of {', '.join(MODES)}")
    max_len: int | None = Field(
        default=None, ge=1, description="seq-mean-token-sum-norm's constant length (default: rollout.max_tokens)"
    )
    loss: str = Field(default="ppo", description="ppo | gspo | cispo | reinforce | sft, or 'pkg.module:fn'")
    clip_low: float = 0.2
    clip_high: float = Field(default=0.2, description="DAPO's clip-higher: set above clip_low")
    dual_clip: float | None = Field(default=None, gt=1, description="dual-clip PPO's bound c on negative advantages")
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    kl_in_reward: bool = Field(
        default=False,
        description="KL as a per-token reward penalty (REINFORCE++'s way) instead of a loss term; needs kl_coef",
    )
    entropy_coef: float = Field(default=0.0, ge=0, description="entropy bonus: - coef x entropy per token")
    ppo_epochs: int = Field(default=1, ge=1, description="passes over each rollout batch (each its own steps)")
    mini_batch_size: int | None = Field(
        default=None, ge=1, description="samples per optimiser step (default: the whole batch, one step per epoch)"
    )
    shuffle: bool = Field(default=True, description="each epoch walks the batch's mini-batches in a fresh order")
    old_logprobs: Literal["recompute", "rollout"] = Field(
        default="recompute", description="importance-ratio denominator: trainer's recomputed or engine's"
    )
    overlong_buffer: int | None = Field(
        default=None,
        ge=1,
        description="DAPO's overlong shaping: the last this-many tokens before max_len cost up to -1 reward, linearly",
    )
    tis: TISConfig | None = Field(default=None, description="truncated importance weights vs the engine's log-probs")
    mis: MISConfig | None = Field(default=None, description="masked importance sampling (IcePop) vs the engine's")
    temperature: float | None = Field(default=None, description="defaults to rollout.temperature")
    routing_replay: bool = Field(
        default=False,
        description="MoE (R3): the engine returns the experts it routed every token to, the trainer replays them",
    )
    value_clip: float | None = Field(
        default=0.2, gt=0, description="critic: a new value may move this far from the old one before the loss clips"
    )
    critic_warmup_steps: int = Field(
        default=0, ge=0, description="RL steps that train only the critic (the policy waits for useful values)"
    )

    @model_validator(mode="after")
    def _preset(self) -> AlgorithmConfig:
        preset = PRESETS[self.name]
        self.estimator = self.estimator or preset["estimator"]
        self.aggregation = self.aggregation or preset["aggregation"]
        if self.aggregation not in MODES:
            raise ValueError(f"algorithm.aggregation={self.aggregation!r}: use one of {', '.join(MODES)}")
        if self.kl_in_reward and not self.kl_coef:
            raise ValueError("algorithm.kl_in_reward needs algorithm.kl_coef > 0 (the penalty's weight)")
        return self  # an unknown estimator or loss name fails in preflight, naming its key

    def loss_kwargs(self) -> dict[str, Any]:
        """The loss's parameters, and how the trainer aggregates it."""
        out: dict[str, Any] = {
            "clip_low": self.clip_low,
            "clip_high": self.clip_high,
            "kl_coef": 0.0 if self.kl_in_reward else self.kl_coef,  # in the reward, not also in the loss
            "kl_estimator": self.kl_estimator,
            "aggregation": self.aggregation,
            "max_len": self.max_len,
        }
        if self.entropy_coef:
            out["entropy_coef"] = self.entropy_coef
        if self.dual_clip is not None:
            out["dual_clip"] = self.dual_clip
        if self.tis is not None:
            out["tis"] = self.tis.model_dump()
        if self.mis is not None:
            out["mis"] = self.mis.model_dump()
        return out

    def value_kwargs(self) -> dict[str, Any]:
        """The critic's loss parameters (its aggregation is the policy's)."""
        return {"value_clip": self.value_clip, "aggregation": self.aggregation, "max_len": self.max_len}


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO: 0 up to max_len - buffer tokens, then falling linearly to -1 at max_len (and -1 beyond)."""
    if length <= max_len - buffer:
        return 0.0
    return max(-1.0, (max_len - buffer - length) / buffer)


def assign_advantages(
    groups: list[Group], cfg: AlgorithmConfig, max_len: int | None = None, penalty: list[list[float]] | None = None
) -> list[Sample]:
    """Each sample gets its per-token advantages (see `estimate`), and their mean as `advantage` for logs."""
    return estimate(groups, cfg, max_len, penalty)[0]


def estimate(
    groups: list[Group],
    cfg: AlgorithmConfig,
    max_len: int | None = None,
    penalty: list[list[float]] | None = None,
    values: list[list[float]] | None = None,
) -> tuple[list[Sample], list[list[float]]]:
    """Runs the estimator over the whole batch at once (REINFORCE++ whitens over the batch's tokens), sets each
    sample's advantages and returns (samples, per-token returns). With `overlong_buffer`, long responses lose
    reward first (`max_len`: the response budget, rollout.max_tokens unless algorithm.max_len says); `penalty`
    (per response token, e.g. kl_coef x KL to the reference) is taken off each token's reward; `values` (per
    response token) are the critic's, for GAE."""
    import torch

    from vime.algorithms.estimators import ESTIMATORS, token_rewards

    samples = [s for g in groups for s in g]
    if not samples:
        return [], []
    width = max(1, *(len(s.response_ids) for s in samples))
    mask = torch.zeros(len(samples), width)
    for i, s in enumerate(samples):
        mask[i, : len(s.response_ids)] = torch.tensor(s.loss_mask[: len(s.response_ids)], dtype=torch.float)

    def padded(rows: list[list[float]]) -> torch.Tensor:
        out = torch.zeros_like(mask)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.float)
        return out

    rewards = torch.tensor([float(s.reward or 0.0) for s in samples])
    limit = cfg.max_len or max_len
    if cfg.overlong_buffer and limit:
        shaped = [overlong_penalty(len(s.response_ids), limit, cfg.overlong_buffer) for s in samples]
        rewards = rewards + torch.tensor(shaped)
    if penalty is not None:
        rewards = token_rewards(rewards, mask) - padded(penalty) * mask
    group_ids = torch.tensor([k for k, g in enumerate(groups) for _ in g])
    params = {"std": cfg.std, "gamma": cfg.gamma, "lam": cfg.lam, "whiten_advantages": cfg.whiten_advantages}
    v = padded(values) if values is not None else None
    adv, ret = ESTIMATORS.get(str(cfg.estimator))(rewards, mask, group_ids, v, **params)
    for i, s in enumerate(samples):
        n, m = len(s.response_ids), mask[i]
        s.token_advantages = adv[i, :n].tolist()
        s.advantage = float((adv[i] * m).sum() / m.sum()) if m.sum() > 0 else 0.0
    return samples, [ret[i, : len(s.response_ids)].tolist() for i, s in enumerate(samples)]
