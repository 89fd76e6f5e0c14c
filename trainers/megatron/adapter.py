"""HF ↔ Megatron state dicts (local layer spec), with TP sharding and PP layer placement.

Three layers of names: HF (`model.layers.3.self_attn.q_proj.weight`), global Megatron
(`decoder.layers.3.self_attention.linear_qkv.weight`, unsharded) and local Megatron (the names of one rank's
module: stage-local layer numbers, TP shards). `from_hf`/`to_hf` convert HF ↔ global; `shard`/`unshard` and
`local_to_global` handle the rank's view. MoE experts carry their global index in global names
(`mlp.experts.local_experts.<e>`, e over all experts) and their index on the expert-parallel rank in local names;
experts are never TP-sharded (the spec sets expert TP = 1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

from trainers.megatron.spec import head_dim, is_moe_layer, num_experts, qkv_bias, spec_for

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)\.(.+)$")
_BIAS = "mlp.gate.e_score_correction_bias"  # GLM-4.5's fixed per-expert routing bias (Megatron's expert_bias)

# Per-layer global Megatron suffix → HF suffix (1:1 tensors), every family.
_ONE_TO_ONE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# Per-head q/k norms of fused-qkv attention (Qwen3, GLM-4.5).
_QK_NORMS = {
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
# Multi-latent attention (DeepSeek-V3): every projection is one HF tensor in the same layout (q heads are
# [nope | rope], kv_b heads [k_nope | v], kv_a rows [latent | rope key] on both sides; rope dims stay
# interleaved, which Megatron's MLA expects); Megatron's q/kv "layernorms" are HF's latent norms. `q_proj`
# replaces q_a/q_b where `q_lora_rank` is null.
_MLA = {
    "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",
    "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
    "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
}
# TP split dimension of every sharded tensor (by suffix); anything else is replicated.
_TP_DIM = {
    "word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "linear_qkv.weight": 0,
    "linear_qkv.bias": 0,
    "linear_proj.weight": 1,
    "linear_fc2.weight": 1,
    "linear_fc1.weight": 0,
    # MLA: all four column-parallel (the down projections too: Megatron gathers their outputs), so heads and
    # latent rows split in contiguous blocks
    "linear_q_proj.weight": 0,
    "linear_q_down_proj.weight": 0,
    "linear_q_up_proj.weight": 0,
    "linear_kv_down_proj.weight": 0,
    "linear_kv_up_proj.weight": 0,
}


def _one_to_one(cfg: Any) -> dict[str, str]:
    return {**_ONE_TO_ONE, **(_MLA if spec_for(cfg).mla else _QK_NORMS)}


def _qkv_dims(cfg: Any) -> tuple[int, int, int]:
    groups = cfg.num_key_value_heads
    return groups, cfg.num_attention_heads // groups, head_dim(cfg)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: Any) -> torch.Tensor:
    """Per query group g: [q heads of g | k_g | v_g] (works for weights [*, H] and biases [*])."""
    ng, hpg, hd = _qkv_dims(cfg)
    tail = q.shape[1:]
    return torch.cat([q.reshape(ng, hpg * hd, *tail), k.reshape(ng, hd, *tail), v.reshape(ng, hd, *tail)], 1).reshape(
        -1, *tail
    )


def split_qkv(qkv: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ng, hpg, hd = _qkv_dims(cfg)
    tail = qkv.shape[1:]
    q, k, v = qkv.reshape(ng, (hpg + 2) * hd, *tail).split([hpg * hd, hd, hd], 1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def from_hf(hf: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """HF state dict → global (unsharded) Megatron state dict."""
    out = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
        "output_layer.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"]),
    }
    one_to_one, mla = _one_to_one(cfg), spec_for(cfg).mla
    for i in range(cfg.num_hidden_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for ms, hs in one_to_one.items():
            if p + hs in hf:
                out[m + ms] = hf[p + hs]
        if not mla:
            out.update(_qkv_from_hf(hf, p, m, cfg))
        if is_moe_layer(cfg, i):
            out.update(_experts_from_hf(hf, p, m, cfg))
        else:
            out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
    return out


def _qkv_from_hf(hf: dict[str, torch.Tensor], p: str, m: str, cfg: Any) -> dict[str, torch.Tensor]:
    a = p + "self_attn."
    out = {
        m + "self_attention.linear_qkv.weight": fuse_qkv(
            hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"], cfg
        )
    }
    if qkv_bias(cfg):
        out[m + "self_attention.linear_qkv.bias"] = fuse_qkv(
            hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"], cfg
        )
    return out


def _experts_from_hf(hf: dict[str, torch.Tensor], p: str, m: str, cfg: Any) -> dict[str, torch.Tensor]:
    """Router ← HF `mlp.gate` (and its score bias); expert e's fc1 = [gate; up], fc2 = down (HF stores experts
    one by one); GLM-4.5's shared experts are one gated MLP."""
    out = {m + "mlp.router.weight": hf[p + "mlp.gate.weight"]}
    if p + _BIAS in hf:
        out[m + "mlp.router.expert_bias"] = hf[p + _BIAS]
    for e in range(num_experts(cfg)):
        h, me = f"{p}mlp.experts.{e}.", f"{m}mlp.experts.local_experts.{e}."
        out[me + "linear_fc1.weight"] = torch.cat([hf[h + "gate_proj.weight"], hf[h + "up_proj.weight"]])
        out[me + "linear_fc2.weight"] = hf[h + "down_proj.weight"]
    h, ms = p + "mlp.shared_experts.", m + "mlp.shared_experts."
    if h + "gate_proj.weight" in hf:
        out[ms + "linear_fc1.weight"] = torch.cat([hf[h + "gate_proj.weight"], hf[h + "up_proj.weight"]])
        out[ms + "linear_fc2.weight"] = hf[h + "down_proj.weight"]
    return out


def to_hf(name: str, t: torch.Tensor, cfg: Any) -> list[tuple[str, torch.Tensor]]:
    """One global Megatron tensor → its HF tensors (an empty list for the tied output layer)."""
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", t)]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", t)]
    if name == "output_layer.weight":
        return [] if cfg.tie_word_embeddings else [("lm_head.weight", t)]
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"no HF name for Megatron tensor {name!r}")
    p, suffix = f"model.layers.{m.group(1)}.", m.group(2)
    if suffix == "mlp.router.weight":
        return [(p + "mlp.gate.weight", t)]
    if suffix == "mlp.router.expert_bias":
        return [(p + _BIAS, t)]
    if suffix.startswith("mlp.shared_experts."):
        h = p + "mlp.shared_experts."
        if suffix.endswith("linear_fc1.weight"):
            gate, up = t.chunk(2)
            return [(h + "gate_proj.weight", gate), (h + "up_proj.weight", up)]
        return [(h + "down_proj.weight", t)]
    e = _EXPERT.match(name)
    if e:
        h = f"{p}mlp.experts.{e.group(2)}."
        if e.group(3) == "linear_fc1.weight":
            gate, up = t.chunk(2)
            return [(h + "gate_proj.weight", gate), (h + "up_proj.weight", up)]
        if e.group(3) == "linear_fc2.weight":
            return [(h + "down_proj.weight", t)]
    one_to_one = _one_to_one(cfg)
    if suffix in one_to_one:
        return [(p + one_to_one[suffix], t)]
    if suffix.startswith("self_attention.linear_qkv."):
        kind = suffix.rsplit(".", 1)[1]
        q, k, v = split_qkv(t, cfg)
        return [(f"{p}self_attn.{n}_proj.{kind}", x) for n, x in zip("qkv", (q, k, v))]
    if suffix == "mlp.linear_fc1.weight":
        gate, up = t.chunk(2)
        return [(p + "mlp.gate_proj.weight", gate), (p + "mlp.up_proj.weight", up)]
    raise KeyError(f"no HF name for Megatron tensor {name!r}")


def tp_dim(name: str) -> int | None:
    if is_expert(name):
        return None
    for suffix, dim in _TP_DIM.items():
        if name.endswith(suffix):
            return dim
    return None


def shard(name: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    dim = tp_dim(name)
    if dim is None or tp == 1:
        return full
    if name.endswith("linear_fc1.weight"):  # gate and up are split separately, then re-fused per rank
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    return full.chunk(tp, dim)[rank]


def unshard(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    dim = tp_dim(name)
    if dim is None or len(parts) == 1:
        return parts[0]
    if name.endswith("linear_fc1.weight"):
        gates, ups = zip(*(p.chunk(2) for p in parts))
        return torch.cat([torch.cat(gates), torch.cat(ups)])
    return torch.cat(parts, dim)


def is_expert(name: str) -> bool:
    return _EXPERT.match(name) is not None


def expert_to_global(name: str, ep_rank: int, experts_per_rank: int) -> str:
    """Local expert j on expert-parallel rank r is global expert r * experts_per_rank + j."""
    e = _EXPERT.match(name)
    if not e:
        return name
    return f"{e.group(1)}{ep_rank * experts_per_rank + int(e.group(2))}.{e.group(3)}"


def local_to_global(name: str, pp_rank: int, layers_per_stage: int, ep_rank: int = 0, experts_per_rank: int = 0) -> str:
    m = _LAYER.match(name)
    if not m:
        return name
    name = f"decoder.layers.{pp_rank * layers_per_stage + int(m.group(1))}.{m.group(2)}"
    return expert_to_global(name, ep_rank, experts_per_rank)


def local_state_dict(
    full: dict[str, torch.Tensor],
    local_names: Iterable[str],
    *,
    tp_rank: int,
    tp: int,
    pp_rank: int,
    layers_per_stage: int,
    ep_rank: int = 0,
    experts_per_rank: int = 0,
) -> dict[str, torch.Tensor]:
    """The shards one rank's module expects, from a global state dict."""
    out = {}
    for name in local_names:
        g = local_to_global(name, pp_rank, layers_per_stage, ep_rank, experts_per_rank)
        if g not in full:
            raise KeyError(f"HF checkpoint provides no tensor for Megatron parameter {g!r}")
        out[name] = shard(g, full[g], tp_rank, tp).clone()
    return out
