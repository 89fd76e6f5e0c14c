"""DeepSeek-V3's multi-latent attention (MLA) on megatron-core 0.16.1's own `MLASelfAttention`, without
Transformer Engine: the config in `MLATransformerConfig`'s terms, and the core attention the local layer spec
needs (its `DotProductAttention` refuses the keyword arguments MLA builds it with).
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.dot_product_attention import DotProductAttention


class MLADotProductAttention(DotProductAttention):
    """Megatron's unfused attention for MLA. `MultiLatentAttention` builds its core attention with
    `k_channels` / `v_channels` (q/k heads are nope + rope wide, v heads `v_head_dim`), which only TE's
    attention accepts: 0.16.1's local spec fails with `unexpected keyword argument 'k_channels'` (the base
    `Attention` builds one first without them, then MLA replaces it). The local attention's matmuls take any
    q/k width; its output is sized by `kv_channels`, which `mla_config` sets to `v_head_dim`, checked here; the
    scale comes from MLA (`softmax_scale`, with YaRN's mscale)."""

    def __init__(
        self, config: Any, *args: Any, k_channels: int | None = None, v_channels: int | None = None, **kwargs: Any
    ) -> None:
        if v_channels is not None and v_channels != config.kv_channels:
            raise ValueError(f"MLA: kv_channels ({config.kv_channels}) must be v_head_dim ({v_channels})")
        super().__init__(config, *args, **kwargs)


def use_local_core_attention(layer_specs: list[Any]) -> None:
    """Point each MLA layer spec's core attention at `MLADotProductAttention` (in place)."""
    for layer in layer_specs:
        layer.submodules.self_attention.submodules.core_attention = MLADotProductAttention


def mla_config(hf_cfg: Any, tp: int, rope_theta: float) -> dict[str, Any]:
    """DeepSeek-V3's attention in `MLATransformerConfig`'s terms. Megatron's MLA always reads the rotary
    dimensions in DeepSeek's interleaved pair layout (its unfused rope de-interleaves them, as HF does when
    `rope_interleave`; `rotary_interleaved` is a different layout and refused with MLA), so HF's non-interleaved
    variant is refused. `kv_channels` must be `v_head_dim` (see `MLADotProductAttention`). The latent
    projections have no bias in Megatron, so `attention_bias` is refused too."""
    name = hf_cfg.model_type
    if not getattr(hf_cfg, "rope_interleave", True):
        raise ValueError(f"{name} with rope_interleave false: Megatron's MLA rotates interleaved pairs only")
    if getattr(hf_cfg, "attention_bias", False):
        raise ValueError(f"{name} with attention_bias true: Megatron's MLA projections have no bias")
    rank_dims = [hf_cfg.kv_lora_rank + hf_cfg.qk_rope_head_dim] + ([hf_cfg.q_lora_rank] if hf_cfg.q_lora_rank else [])
    if any(d % tp for d in rank_dims) or hf_cfg.num_attention_heads % tp:
        raise ValueError(
            f"trainer.tp={tp} must divide num_attention_heads ({hf_cfg.num_attention_heads}) and the latent "
            f"widths kv_lora_rank + qk_rope_head_dim, q_lora_rank ({rank_dims}): Megatron column-shards MLA's "
            "down projections"
        )
    return {
        "multi_latent_attention": True,
        "q_lora_rank": hf_cfg.q_lora_rank,
        "kv_lora_rank": hf_cfg.kv_lora_rank,
        "qk_head_dim": hf_cfg.qk_nope_head_dim,
        "qk_pos_emb_head_dim": hf_cfg.qk_rope_head_dim,
        "v_head_dim": hf_cfg.v_head_dim,
        "kv_channels": hf_cfg.v_head_dim,
        "rotary_base": rope_theta,
        "apply_rope_fusion": False,  # fused MLA rope exists for yarn only (and needs TE)
        **_rope(hf_cfg),
    }


def _rope(hf_cfg: Any) -> dict[str, Any]:
    """HF's `rope_parameters` as Megatron's MLA rope: plain ("default") or YaRN (DeepSeek-V3's own: factor 40,
    mscale = mscale_all_dim = 1). Both sides scale cos/sin by mscale(factor, mscale) / mscale(factor,
    mscale_all_dim) and the softmax by mscale(factor, mscale_all_dim)²; HF's fallbacks for absent keys are
    spelled out here, and the cases where the two disagree (an explicit `attention_factor`, `truncate` off,
    `mscale_all_dim` without `mscale`) are refused."""
    params = dict(getattr(hf_cfg, "rope_parameters", None) or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return {"rope_type": "rope", "rotary_scaling_factor": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}
    if kind != "yarn":
        raise ValueError(f"{hf_cfg.model_type} with rope_type {kind!r}: Megatron's MLA has default and yarn")
    orig = int(params["original_max_position_embeddings"])
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    if (
        params.get("attention_factor") is not None
        or params.get("truncate", True) is False
        or (mscale_all and not mscale)
    ):
        raise ValueError(f"{hf_cfg.model_type}: yarn rope_parameters {params} have no Megatron MLA equivalent")
    return {
        "rope_type": "yarn",
        "rotary_scaling_factor": float(params.get("factor") or hf_cfg.max_position_embeddings / orig),
        "original_max_position_embeddings": orig,
        "beta_fast": float(params.get("beta_fast") or 32),
        "beta_slow": float(params.get("beta_slow") or 1),
        "mscale": float(mscale or 1.0),
        "mscale_all_dim": float(mscale_all or 0.0),
    }
