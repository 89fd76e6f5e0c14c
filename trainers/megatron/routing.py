"""Rollout routing replay (R3) on the trainer side: every MoE router picks the experts the engine picked.

A router's gate is computed live (its weights still train through the replayed experts' probabilities), only
the top-k choice is the engine's. Megatron-core's `RouterReplay` is the hook (`moe_enable_routing_replay`), but
its class-level registry spans every model a process builds (policy and reference would share it) and its
backward replay list assumes recomputation; so each model gets its own `Replay`, which sets the indices of its
own routers per micro-batch and leaves positions without engine routes (-1: padding, the final token, samples
from a route-less source) to live routing. It also counts how often live routing would have chosen otherwise,
the metric R3 exists to drive to nothing.
"""

from __future__ import annotations

from typing import Any

import torch


class Replay:
    def __init__(self, model: torch.nn.Module) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.slots: list[tuple[int, Any]] = []
        for m in model.modules():
            if isinstance(m, TopKRouter):
                if m.router_replay is None:
                    raise RuntimeError("routing replay needs TransformerConfig(moe_enable_routing_replay=True)")
                slot = len(self.slots)
                m.router_replay.get_replay_topk = self._topk_fn(slot)
                self.slots.append((m.layer_number - 1, m))  # routes index layers as the engines do: all of them
        self.targets: list[torch.Tensor | None] = [None] * len(self.slots)
        self.counts: torch.Tensor | None = None  # [replayed, disagreed], on the router's device (no sync per layer)
        # which routers counted the loaded micro-batch: activation recompute runs its forward again in backward
        # (grad mode is on in both passes, so nothing else tells them apart), and a choice is one choice
        self.counted = [False] * len(self.slots)

    def load(self, routes: torch.Tensor | None) -> None:
        """Routes [b, s, layers, k] of the coming forward (None: route live). Megatron's routers see tokens
        sequence-major, [s, b] flattened."""
        self.counted = [False] * len(self.slots)
        for j, (layer, _) in enumerate(self.slots):
            if routes is None:
                self.targets[j] = None
            else:
                r = routes[:, :, layer]
                self.targets[j] = r.transpose(0, 1).reshape(-1, r.shape[-1]).long()

    def take_counts(self) -> tuple[float, float]:
        """(token-layer choices replayed, of which live routing disagreed) since the last call."""
        c, self.counts = self.counts, None
        return (0.0, 0.0) if c is None else (float(c[0]), float(c[1]))

    def _topk_fn(self, slot: int) -> Any:
        def topk(scores: torch.Tensor, k: int, num_groups: Any = None, group_topk: Any = None, default=None):
            live_probs, live = default(scores, k, num_groups=num_groups, group_topk=group_topk)
            target = self.targets[slot]
            if target is None:
                return live_probs, live
            if target.shape != live.shape:
                raise RuntimeError(
                    f"routing replay: routes for {tuple(target.shape)} token choices, the router has "
                    f"{tuple(live.shape)} (a sample's routes do not match its tokens)"
                )
            target = target.to(live.device)
            given = target[:, :1] >= 0
            idx = torch.where(given, target, live)
            if not self.counted[slot]:
                self.counted[slot] = True
                same = (idx.sort(-1).values == live.sort(-1).values).all(-1, keepdim=True)
                c = torch.stack([given.sum(), (given & ~same).sum()])
                self.counts = c if self.counts is None else self.counts + c
            return scores.gather(1, idx), idx

        return topk


def replay_for(model: torch.nn.Module) -> Replay:
    """The model's own replay (made once per model: the policy and the frozen reference each have one)."""
    found = getattr(model, "_vime_replay", None)
    if found is None:
        found = Replay(model)
        model._vime_replay = found  # type: ignore[assignment]
    return found


def replay_if_routed(worker: Any, model: torch.nn.Module, mbs: list[dict[str, torch.Tensor]]) -> Replay | None:
    """The model's routing replay when a micro-batch carries the engine's routes (R3), else None."""
    if not any("routes" in mb for mb in mbs):
        return None
    if not worker.tcfg.num_moe_experts:
        raise ValueError("samples carry routed experts (algorithm.routing_replay) but the model has no experts")
    if worker.cfg.recompute and worker.cfg.pp > 1:  # a pipeline recomputes a micro-batch after the next one's load
        raise ValueError("algorithm.routing_replay with trainer.recompute needs trainer.pp=1")
    return replay_for(model)


def counts(worker: Any) -> dict[str, float]:
    """R3's metrics since the last call, over all ranks: the share of replayed expert choices that live routing
    would have made differently (and how many were replayed)."""
    import torch.distributed as dist

    c = torch.zeros(2)
    for m in (worker.model, getattr(worker, "ref", None)):
        found = getattr(m, "_vime_replay", None) if m is not None else None
        if found is not None:
            c += torch.tensor(found.take_counts())
    c = c.to("cpu" if worker.on_cpu else "cuda")
    dist.all_reduce(c)
    replayed, disagreed = float(c[0]), float(c[1])
    return {} if not replayed else {"r3_disagree": disagreed / replayed, "r3_replayed": replayed}
