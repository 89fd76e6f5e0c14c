"""Tiny HF models made locally: no hub is reachable, so every test runs the real HF/vLLM loading code on models
this module writes (random weights from a seed, a byte-level BPE tokenizer trained on a shipped corpus, a chat
template with special tokens)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).parent / "assets" / "corpus.txt"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Qwen-style ChatML; tools are rendered Hermes-style into the system turn, tool results as a `tool` role.
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "You may call tools. Tools: {{ tools | tojson }}\n"
    'Call one as <tool_call>{"name": ..., "arguments": {...}}</tool_call><|im_end|>\n'
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if not (m.role == 'system' and loop.first) %}"
    "<|im_start|>{{ m.role }}\n{{ m.content if m.content is not none else '' }}"
    '{% if m.tool_calls %}{% for tc in m.tool_calls %}<tool_call>{"name": "{{ tc.function.name }}", '
    '"arguments": {{ tc.function.arguments if tc.function.arguments is string else tc.function.arguments | tojson }}}'
    "</tool_call>{% endfor %}{% endif %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie: bool | None = None  # None: the architecture's default
    init_std: float = 0.1


# From 0.5b on they have the real Qwen2.5 shapes (GPU benchmarks); their tokenizer stays small (ids above it are
# never sampled by a trained policy, but a random one may emit them — they decode to "").
SIZES = {
    "tiny": Size(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512),
    "small": Size(hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=2, vocab=512),
    "100m": Size(hidden=768, intermediate=3072, layers=12, heads=12, kv_heads=4, vocab=512),
    "500m": Size(hidden=1024, intermediate=5632, layers=24, heads=16, kv_heads=2, vocab=512),
    "0.5b": Size(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936, tie=True, init_std=0.02),
    "1.5b": Size(
        hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, vocab=151936, tie=True, init_std=0.02
    ),
    "7b": Size(
        hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064, tie=False, init_std=0.02
    ),
    "14b": Size(
        hidden=5120, intermediate=13824, layers=48, heads=40, kv_heads=8, vocab=152064, tie=False, init_std=0.02
    ),
    "32b": Size(
        hidden=5120, intermediate=27648, layers=64, heads=40, kv_heads=8, vocab=152064, tie=False, init_std=0.02
    ),
}
TOKENIZER_VOCAB = 512
ARCHS = ("qwen2", "qwen3", "llama", "qwen3_moe", "glm4_moe", "deepseek_v3")
# Mixture-of-Experts shape added to a Size: 8 experts, top-2, each expert a quarter of the dense MLP.
MOE_EXPERTS, MOE_TOPK, MOE_FFN_DIVISOR = 8, 2, 4


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer wrapped as a transformers fast tokenizer with the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(CORPUS)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:2] + SPECIALS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def hf_config(arch: str, size: Size, *, tie: bool | None = None) -> Any:
    import transformers as tf

    common = {
        "vocab_size": size.vocab,
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "initializer_range": size.init_std,
        "dtype": "float32",
    }
    # Size.tie is Qwen2.5's (0.5B/1.5B tie); Qwen3-MoE models are untied at every size, and SGLang's Qwen3-MoE
    # ignores tie_word_embeddings (its lm_head stays as initialised: 0.53 nats off the trainer on an H100)
    tie = (None if arch in ("qwen3_moe", "glm4_moe", "deepseek_v3") else size.tie) if tie is None else tie
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True if tie is None else tie, rope_theta=1_000_000.0)
    if arch == "qwen3":
        return tf.Qwen3Config(
            **common,
            head_dim=size.hidden // size.heads,
            tie_word_embeddings=True if tie is None else tie,
            rope_theta=1_000_000.0,
        )
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common,
            head_dim=size.hidden // size.heads,
            tie_word_embeddings=False if tie is None else tie,
            rope_theta=1_000_000.0,
            num_experts=MOE_EXPERTS,
            num_experts_per_tok=MOE_TOPK,
            moe_intermediate_size=size.intermediate // MOE_FFN_DIVISOR,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if arch == "glm4_moe":  # GLM-4.5's features at a small scale: first layer dense, a shared expert, sigmoid
        return tf.Glm4MoeConfig(  # routing with a score bias, half-rotary heads, q/k/v bias
            **common,
            head_dim=size.hidden // size.heads,
            tie_word_embeddings=False if tie is None else tie,
            rope_theta=1_000_000.0,
            partial_rotary_factor=0.5,
            attention_bias=True,
            use_qk_norm=True,
            **_glm_moe(size),
        )
    if arch == "deepseek_v3":
        return _deepseek_v3_config(size, common, tie)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False if tie is None else tie, rope_theta=10_000.0)
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")


def make_model(
    arch: str,
    size: str,
    out: str | Path,
    *,
    seed: int = 0,
    tie: bool | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> Path:
    """Write a standard HF directory (config, safetensors, tokenizer, chat template) that both transformers
    and vLLM load. Same (arch, size, seed, device) → byte-identical weights. Big sizes: `dtype="bfloat16"`,
    `device="cuda"` (initialised on the GPU in seconds instead of minutes on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = SIZES[size]
    tok = train_tokenizer(min(spec.vocab, TOKENIZER_VOCAB))
    cfg = hf_config(arch, spec, tie=tie)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():  # random norm gains and biases, so adapters that drop or swap them are caught
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
        for (
            name,
            b,
        ) in model.named_buffers():  # GLM-4.5's and DeepSeek-V3's routing bias: a buffer, saved with the weights
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "vime_model.json").write_text(json.dumps({"arch": arch, "size": size, "seed": seed}) + "\n")
    return out


def _glm_moe(size: Size) -> dict[str, Any]:
    """GLM-4.5's MoE block, which DeepSeek-V3 shares: first layer dense, one shared expert, scaled routed experts,
    one expert group (group-limited routing is refused by the trainer)."""
    return {
        "n_routed_experts": MOE_EXPERTS,
        "num_experts_per_tok": MOE_TOPK,
        "moe_intermediate_size": size.intermediate // MOE_FFN_DIVISOR,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
    }


def _deepseek_v3_config(size: Size, common: dict[str, Any], tie: bool | None) -> Any:
    """DeepSeek-V3's features at a small scale: multi-latent attention (low-rank q and kv, a shared rotary key
    in DeepSeek's interleaved layout) on GLM-4.5's MoE (dense first layer, shared expert, sigmoid + score bias,
    scaling). transformers 5 writes no `topk_method`/`scoring_func`, and vLLM then skips the score bias
    (`KeyError: ...e_score_correction_bias`): both are set. One expert group (group-limited routing is refused by
    the trainer), no multi-token-prediction layer (nothing trains or serves it). From 0.5B up the attention takes
    DeepSeek's own MLA dimensions, the only ones vLLM's GPU kernels serve: on vLLM 0.26 / H100 a (nope 64, rope 32,
    v 64) model is refused by every MLA prefill backend, (128, 64, 128, kv rank 512) starts and generates."""
    import transformers as tf

    head = size.hidden // size.heads
    common = {**common, "num_key_value_heads": size.heads}  # MLA: every head has its own k and v
    gpu = size.hidden >= 512
    nope, rope, v, kv_rank = (128, 64, 128, 512) if gpu else (head, head // 2, head, size.hidden // 4)
    return tf.DeepseekV3Config(
        **common,
        tie_word_embeddings=False if tie is None else tie,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        rope_interleave=True,
        q_lora_rank=size.hidden // 4,
        kv_lora_rank=kv_rank,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=v,
        **_glm_moe(size),
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        num_mtp_layers=0,
    )
