"""HF ↔ Megatron state-dict adapter: pure tensor bookkeeping, checked without any process group."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from trainers.megatron import adapter


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_roundtrip_and_tp_sharding(model_dir, arch):
    d = model_dir(arch)
    cfg = AutoConfig.from_pretrained(d)
    hf = load_file(str(d / "model.safetensors"))
    full = adapter.from_hf(hf, cfg)
    back = {}
    for name, t in full.items():
        back.update(adapter.to_hf(name, t, cfg))
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    for name, t in full.items():
        parts = [adapter.shard(name, t, r, 2) for r in range(2)]
        assert torch.equal(adapter.unshard(name, parts), t)


def test_fc1_shard_is_gate_and_up_chunks(model_dir):
    cfg = AutoConfig.from_pretrained(model_dir("qwen2"))
    hf = load_file(str(model_dir("qwen2") / "model.safetensors"))
    fc1 = adapter.from_hf(hf, cfg)["decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
    r1 = adapter.shard("decoder.layers.0.mlp.linear_fc1.weight", fc1, 1, 2)
    assert torch.equal(r1, torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))
    assert not torch.equal(r1, fc1.chunk(2)[1])


def test_qkv_groups_layout(model_dir):
    cfg = AutoConfig.from_pretrained(model_dir("qwen2"))  # 4 heads, 2 groups, head_dim 32
    q = torch.arange(4 * 32).float()[:, None].expand(-1, 3)
    k = -torch.arange(1, 2 * 32 + 1).float()[:, None].expand(-1, 3)
    v = 1000 + torch.arange(2 * 32).float()[:, None].expand(-1, 3)
    fused = adapter.fuse_qkv(q, k, v, cfg)
    # group 0 = q heads 0,1 | k head 0 | v head 0
    assert torch.equal(fused[:64], q[:64]) and torch.equal(fused[64:96], k[:32]) and torch.equal(fused[96:128], v[:32])
    assert all(torch.equal(a, b) for a, b in zip(adapter.split_qkv(fused, cfg), (q, k, v)))
