"""One plain spec per model family: how its HF config becomes a Megatron GPTModel (torchtitan's "model spec").

The families differ only in a few switches (qkv bias, q/k norm, tied output, experts), so a spec is data, not a
class hierarchy; the state-dict adapter (`adapter.py`) reads the same switches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelSpec:
    family: str
    qkv_bias: bool
    qk_layernorm: bool
    default_rope_theta: float
    moe: bool = False
    # HF config keys that set a switch per checkpoint (GLM-4.5's attention bias and q/k norm vary by model)
    qkv_bias_key: str | None = None
    qk_norm_key: str | None = None
    # "softmax": Qwen3-MoE's top-k of softmax scores; "sigmoid": GLM-4.5's top-k of sigmoid scores plus a fixed
    # per-expert bias (e_score_correction_bias), scaled, with shared experts and the first layers dense
    routing: str = "softmax"
    # DeepSeek-V3's multi-latent attention (Megatron's MLASelfAttention): low-rank q and kv with RMSNorms on
    # the latents (Megatron's q_layernorm / kv_layernorm, hence qk_layernorm) and a shared rotary key
    mla: bool = False


SPECS = {
    "qwen2": ModelSpec("qwen2", qkv_bias=True, qk_layernorm=False, default_rope_theta=1_000_000.0),
    "qwen3": ModelSpec("qwen3", qkv_bias=False, qk_layernorm=True, default_rope_theta=1_000_000.0),
    "llama": ModelSpec("llama", qkv_bias=False, qk_layernorm=False, default_rope_theta=10_000.0),
    "qwen3_moe": ModelSpec("qwen3_moe", qkv_bias=False, qk_layernorm=True, default_rope_theta=1_000_000.0, moe=True),
    "glm4_moe": ModelSpec(
        "glm4_moe",
        qkv_bias=False,
        qk_layernorm=False,
        default_rope_theta=10_000.0,
        moe=True,
        qkv_bias_key="attention_bias",
        qk_norm_key="use_qk_norm",
        routing="sigmoid",
    ),
    "deepseek_v3": ModelSpec(
        "deepseek_v3",
        qkv_bias=False,
        qk_layernorm=True,
        default_rope_theta=10_000.0,
        moe=True,
        routing="sigmoid",
        mla=True,
    ),
}


def spec_for(hf_cfg: Any) -> ModelSpec:
    family = hf_cfg.model_type
    if family not in SPECS:
        raise ValueError(f"model_type {family!r} has no Megatron spec; supported: {sorted(SPECS)}")
    return SPECS[family]


def rope_theta(hf_cfg: Any, spec: ModelSpec) -> float:
    """transformers 5 keeps it in `rope_parameters`; older versions as `rope_theta`."""
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(hf_cfg, "rope_theta", None) or spec.default_rope_theta)


def head_dim(hf_cfg: Any) -> int:
    return int(getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads)


def qkv_bias(hf_cfg: Any) -> bool:
    spec = spec_for(hf_cfg)
    return bool(getattr(hf_cfg, spec.qkv_bias_key)) if spec.qkv_bias_key else spec.qkv_bias


def qk_layernorm(hf_cfg: Any) -> bool:
    spec = spec_for(hf_cfg)
    return bool(getattr(hf_cfg, spec.qk_norm_key)) if spec.qk_norm_key else spec.qk_layernorm


def rotary_percent(hf_cfg: Any) -> float:
    """GLM-4.5 rotates the first half of each head (`partial_rotary_factor`, transformers 5 keeps it in
    `rope_parameters`), as Megatron's `rotary_percent` does (same non-interleaved halves)."""
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor") or getattr(hf_cfg, "partial_rotary_factor", None) or 1.0)


def num_experts(hf_cfg: Any) -> int:
    return int(getattr(hf_cfg, "num_experts", None) or getattr(hf_cfg, "n_routed_experts", None) or 0)


def dense_layers(hf_cfg: Any) -> int:
    """How many leading layers keep a dense MLP (GLM-4.5's `first_k_dense_replace`; Qwen3-MoE: none)."""
    return int(getattr(hf_cfg, "first_k_dense_replace", 0) or 0) if spec_for(hf_cfg).moe else 0


def is_moe_layer(hf_cfg: Any, layer: int) -> bool:
    return spec_for(hf_cfg).moe and layer >= dense_layers(hf_cfg)


def moe_config(hf_cfg: Any, ep: int) -> dict[str, Any]:
    """MoE routing in Megatron's terms (Qwen3-MoE: softmax top-k, renormalised over the k when HF's
    `norm_topk_prob`, Megatron's `pre_softmax=False`; GLM-4.5: `_sigmoid_routing`), no load-balancing loss (RL
    does not train the balance; `trainer.args` can turn one on). Experts are never TP-sharded (expert TP = 1):
    the adapter and the push rely on it."""
    if not spec_for(hf_cfg).moe:
        if ep > 1:
            raise ValueError(f"trainer.ep={ep} needs a Mixture-of-Experts model; {hf_cfg.model_type} has no experts")
        return {}
    experts = num_experts(hf_cfg)
    if experts % ep:
        raise ValueError(f"trainer.ep={ep} must divide the model's num_experts ({experts})")
    if getattr(hf_cfg, "mlp_only_layers", None) or getattr(hf_cfg, "decoder_sparse_step", 1) != 1:
        raise ValueError("Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step != 1) is not supported")
    routing = _sigmoid_routing(hf_cfg) if spec_for(hf_cfg).routing == "sigmoid" else _softmax_routing(hf_cfg)
    return {
        "num_moe_experts": experts,
        "moe_router_topk": hf_cfg.num_experts_per_tok,
        "moe_ffn_hidden_size": hf_cfg.moe_intermediate_size,
        **routing,
        "moe_router_load_balancing_type": "none",
        "moe_aux_loss_coeff": 0.0,
        "moe_token_dispatcher_type": "alltoall",
        "moe_grouped_gemm": False,
        "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": 1,
        "moe_enable_routing_replay": True,  # the hook R3 sets per micro-batch; idle (live routing) without routes
    }


def _softmax_routing(hf_cfg: Any) -> dict[str, Any]:
    return {"moe_router_score_function": "softmax", "moe_router_pre_softmax": not hf_cfg.norm_topk_prob}


def _sigmoid_routing(hf_cfg: Any) -> dict[str, Any]:
    """GLM-4.5 and DeepSeek-V3: experts chosen by sigmoid score + `e_score_correction_bias` (Megatron's expert
    bias, loaded from the checkpoint and held fixed: its load-balancing update rate is 0, so engine and trainer
    route alike), the chosen scores renormalised (Megatron always does for k > 1, HF when `norm_topk_prob`) and
    scaled by `routed_scaling_factor`; shared experts beside them; the first `first_k_dense_replace` layers
    dense."""
    name = hf_cfg.model_type
    if not hf_cfg.norm_topk_prob:
        raise ValueError(f"{name} MoE with norm_topk_prob false: Megatron renormalises sigmoid top-k; not supported")
    if getattr(hf_cfg, "scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"{name} MoE with scoring_func={hf_cfg.scoring_func!r}: only sigmoid is supported")
    shared = hf_cfg.moe_intermediate_size * (hf_cfg.n_shared_experts or 0)
    dense = dense_layers(hf_cfg)
    return {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_bias_update_rate": 0.0,
        "moe_router_topk_scaling_factor": float(hf_cfg.routed_scaling_factor),
        "moe_router_dtype": "fp32",  # HF and vLLM score in fp32
        "moe_shared_expert_intermediate_size": shared or None,
        "moe_layer_freq": [0] * dense + [1] * (hf_cfg.num_hidden_layers - dense),
        **_group_routing(hf_cfg),
    }


def _group_routing(hf_cfg: Any) -> dict[str, Any]:
    """Group-limited routing (`n_group` groups, the best `topk_group` of them by the sum of each group's top two
    biased scores, top-k within those). Megatron ranks groups by the sum of their top `topk // group_topk`, so
    the two agree only where that is 2 (DeepSeek-V3: 8 // 4); anything else is refused rather than routed
    differently from the engines."""
    groups, chosen = hf_cfg.n_group or 1, hf_cfg.topk_group or 1
    if groups == 1:
        return {}
    if hf_cfg.num_experts_per_tok // chosen != 2:
        raise ValueError(
            f"{hf_cfg.model_type} MoE with n_group={groups}, topk_group={chosen}, num_experts_per_tok="
            f"{hf_cfg.num_experts_per_tok}: HF ranks groups by their top-2 scores, Megatron by their top "
            f"num_experts_per_tok // topk_group = {hf_cfg.num_experts_per_tok // chosen}; not supported"
        )
    return {"moe_router_num_groups": groups, "moe_router_group_topk": chosen}


def transformer_config(
    hf_cfg: Any, *, tp: int, pp: int, dtype: torch.dtype, on_cpu: bool, recompute: bool = False, ep: int = 1
):
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    from trainers.megatron import mla

    heads, groups = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads
    if groups % tp or hf_cfg.vocab_size % tp or hf_cfg.intermediate_size % tp:
        raise ValueError(
            f"trainer.tp={tp} must divide num_key_value_heads ({groups}), vocab_size "
            f"({hf_cfg.vocab_size}) and intermediate_size ({hf_cfg.intermediate_size})"
        )
    if hf_cfg.num_hidden_layers % pp:
        raise ValueError(f"trainer.pp={pp} must divide num_hidden_layers ({hf_cfg.num_hidden_layers})")
    is_mla = spec_for(hf_cfg).mla
    common = dict(
        num_layers=hf_cfg.num_hidden_layers,
        hidden_size=hf_cfg.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim(hf_cfg),
        ffn_hidden_size=hf_cfg.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=qkv_bias(hf_cfg),
        qk_layernorm=qk_layernorm(hf_cfg),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # build on the GPU when there is one. Keep perform_initialization on: in megatron-core 0.16 the GPU init
        # path is also what tags TP-sharded weights (`tensor_model_parallel`); untagged, grad-norm and clipping
        # count only TP rank 0's shard (seen on 2×H100: TP=2 grad norm 6.90 vs 9.11 at TP=1).
        use_cpu_initialization=on_cpu,
        batch_p2p_sync=not on_cpu,
        variable_seq_lengths=False,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        **moe_config(hf_cfg, ep),
    )
    if is_mla:  # its own config class; overrides kv_channels
        return MLATransformerConfig(**{**common, **mla.mla_config(hf_cfg, tp, rope_theta(hf_cfg, spec_for(hf_cfg)))})
    return TransformerConfig(**common)


def build_model(hf_cfg: Any, config: Any, *, pre_process: bool, post_process: bool, tied: bool = True):
    """`tied=False` unties the output layer from the embedding even where the family ties them (the critic
    replaces that layer by its value head)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    from trainers.megatron import mla

    spec = spec_for(hf_cfg)
    if dense_layers(hf_cfg):  # dense and MoE layers mixed (config.moe_layer_freq): one spec per layer
        layer_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    else:
        layer_spec = get_gpt_layer_local_spec(
            num_experts=config.num_moe_experts,
            normalization="RMSNorm",
            qk_layernorm=qk_layernorm(hf_cfg),
            multi_latent_attention=spec.mla,
        )
    if spec.mla:
        mla.use_local_core_attention(getattr(layer_spec, "layer_specs", [layer_spec]))
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=hf_cfg.vocab_size,
        max_sequence_length=hf_cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=bool(hf_cfg.tie_word_embeddings) and tied,
        position_embedding_type="rope",
        rotary_base=rope_theta(hf_cfg, spec),
        rotary_percent=rotary_percent(hf_cfg),
    )
