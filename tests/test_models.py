import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vime.models import make_model


def digest(d):
    return hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()


def test_make_model_is_deterministic_for_a_seed(tmp_path):
    a = make_model("qwen2", "tiny", tmp_path / "a", seed=3)
    b = make_model("qwen2", "tiny", tmp_path / "b", seed=3)
    c = make_model("qwen2", "tiny", tmp_path / "c", seed=4)
    assert digest(a) == digest(b) != digest(c)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


@pytest.mark.parametrize("arch, tied", [("qwen2", True), ("qwen3", True), ("llama", False)])
def test_models_load_in_transformers_with_chat_template(model_dir, arch, tied):
    d = model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert model.config.tie_word_embeddings is tied
    assert model.config.model_type == arch
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok.apply_chat_template([{"role": "user", "content": "3+4="}], add_generation_prompt=True, tokenize=True)[
        "input_ids"
    ]
    text = tok.decode(ids)
    assert text == "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_id == model.config.eos_token_id == 2
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits
    assert out.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(out).all()


def test_unknown_size_or_arch(tmp_path):
    with pytest.raises(ValueError, match="unknown size"):
        make_model("qwen2", "huge", tmp_path)
    with pytest.raises(ValueError, match="unknown arch"):
        make_model("gpt9", "tiny", tmp_path)
