"""The push check's fingerprint (`engines/vllm/fingerprint.py`) on its own, without servers: sums that add up over
fused, sharded and padded engine parameters, the bits-only path where a parameter keeps the dtype it was sent in,
and the bit sums' word definition for 2-byte weights. The checks on real servers are in test_weight_checks.py."""

from __future__ import annotations

import torch


def test_fingerprint_adds_up_over_fused_and_sharded_parameters_and_names_what_differs():
    """The sums are checked per engine parameter: stacked HF tensors add up, shards over workers add up, a
    replicated (or zero-padded) copy must match on every worker, and a coarser engine dtype widens the bound."""
    from engines.vllm.fingerprint import check, tensor_sums

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 4, generator=g) for _ in range(3))
    norm = torch.rand(4, generator=g)
    sent = {
        n: (s, t.numel(), "float32")
        for (n, t), s in zip(
            (("a.q_proj.weight", q), ("a.k_proj.weight", k), ("a.v_proj.weight", v), ("norm.weight", norm)),
            tensor_sums([q, k, v, norm]),
        )
    }
    qkv = torch.cat([q, k, v])
    where = {
        "a.q_proj.weight": "a.qkv.weight",
        "a.k_proj.weight": "a.qkv.weight",
        "a.v_proj.weight": "a.qkv.weight",
        "norm.weight": "norm.weight",
    }

    def worker(qkv_part, norm_copy, dtype="float32"):
        (s1, s2) = tensor_sums([qkv_part, norm_copy])
        return {
            "where": where,
            "params": {
                "a.qkv.weight": {"sums": s1, "numel": qkv_part.numel(), "dtype": dtype},
                "norm.weight": {"sums": s2, "numel": norm_copy.numel(), "dtype": dtype},
            },
        }

    padded = torch.cat([norm, torch.zeros(4)])
    assert check(sent, [worker(qkv, norm)], "e") == []
    assert check(sent, [worker(qkv[:12], norm), worker(qkv[12:], padded)], "e") == []  # TP halves; a padded copy
    assert check(sent, [worker(qkv.bfloat16(), norm.bfloat16(), "bfloat16")], "e") == []  # rounding only
    broken = qkv.clone()
    broken[20, 1] += 0.5
    (bad,) = check(sent, [worker(broken[:12], norm), worker(broken[12:], norm)], "e")
    assert "'a.qkv.weight' (from a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)" in bad
    (bad,) = check(sent, [worker(qkv, norm), worker(qkv, norm * 1.001)], "e")  # one worker's replica drifted
    assert "'norm.weight'" in bad
    # one element one ulp off, the parameter cut over two workers: within the float bound, not the bit sum's
    nudged = qkv.clone()
    nudged[5, 2] = torch.nextafter(nudged[5, 2], torch.tensor(float("inf")))
    (bad,) = check(sent, [worker(nudged[:12], norm), worker(nudged[12:], norm)], "e")
    assert "'a.qkv.weight'" in bad and "Σbits" in bad
    assert check(sent, [worker(nudged.bfloat16(), norm.bfloat16(), "bfloat16")], "e") == []  # another dtype: bound
    rows_only = worker(qkv, norm)  # a packed CPU kernel too large to read back whole: its row sums only
    rows_only["params"]["a.qkv.weight"]["sums"][1] = None
    assert check(sent, [rows_only], "e") == []
    rows_only["params"]["a.qkv.weight"]["sums"][0] += 0.5
    assert len(check(sent, [rows_only], "e")) == 1
    lost = worker(qkv, norm)
    lost["where"] = {**where, "norm.weight": None}
    assert check(sent, [lost], "e") == ["e: the engine has no parameter for 'norm.weight' (dropped on load)"]


def test_data_parallel_engines_are_checked_each_and_named_and_parts_cut_over_all_of_them_add_up():
    """A server of two data-parallel engines of two TP workers each: an attention weight cut over each engine's
    TP workers is a whole copy per engine (a damaged one is named with its engine), an expert weight cut over all
    four workers (vLLM shards MoE layers over DP x TP) adds up only over all of them."""
    from engines.vllm.fingerprint import check, tensor_sums

    g = torch.Generator().manual_seed(1)
    attn, expert = torch.randn(8, 4, generator=g), torch.randn(16, 4, generator=g)
    sent = {
        n: (s, t.numel(), "float32")
        for (n, t), s in zip((("attn", attn), ("w13", expert)), tensor_sums([attn, expert]))
    }

    def worker(dp, attn_part, expert_part):
        s1, s2 = tensor_sums([attn_part, expert_part])
        return {
            "dp": dp,
            "where": {"attn": "attn", "w13": "w13"},
            "params": {
                "attn": {"sums": s1, "numel": attn_part.numel(), "dtype": "float32"},
                "w13": {"sums": s2, "numel": expert_part.numel(), "dtype": "float32"},
            },
        }

    def server(attn_of_engine_1=attn, expert_whole=expert):
        expert_parts = expert_whole.chunk(4)
        return [
            worker(0, attn[:4], expert_parts[0]),
            worker(0, attn[4:], expert_parts[1]),
            worker(1, attn_of_engine_1[:4], expert_parts[2]),
            worker(1, attn_of_engine_1[4:], expert_parts[3]),
        ]

    assert check(sent, server(), "e") == []
    (bad,) = check(sent, server(attn_of_engine_1=attn * 1.01), "e")
    assert bad.startswith("e (DP engine 1): engine parameter 'attn'"), bad
    broken = expert.clone()
    broken[13, 0] += 0.5
    (bad,) = check(sent, server(expert_whole=broken), "e")
    assert bad.startswith("e: engine parameter 'w13'"), bad  # one copy over all engines: no engine to name
    # engines of one worker each, every one holding all of each parameter: each checked alone
    (bad,) = check(sent, [worker(0, attn, expert), worker(1, attn, expert * 1.01)], "e")
    assert bad.startswith("e (DP engine 1): engine parameter 'w13'"), bad


def test_a_parameter_held_in_the_dtype_it_was_sent_in_is_checked_by_its_bit_sums_alone():
    """Where an engine parameter holds what it got in the dtype it got it in, both sides take only the exact bit
    sums (one read of each tensor, not three); the float sums stay for a dtype change. The sender learns which
    names those are from the engines' last answer, and a check that needs float sums it did not take fails."""
    from engines.vllm.fingerprint import check, engine_sums, tensor_sums

    g = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.LayerNorm(80))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    sd = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = list(sd)
    full = tensor_sums(list(sd.values()))
    bits_only = tensor_sums(list(sd.values()), [False] * len(sd))
    assert [b[2] for b in bits_only] == [f[2] for f in full] and all(b[:2] == [None, None] for b in bits_only)

    answer = engine_sums(model, names, ["float32"] * len(names))
    assert all(p["sums"][:2] == [None, None] for p in answer["params"].values())  # exact: bits only
    lean = {n: (s, sd[n].numel(), "float32") for n, s in zip(names, bits_only)}
    assert check(lean, [answer], "e") == []
    with torch.no_grad():  # one element one ulp off on the engine
        w = model[0].weight
        w[3, 7] = torch.nextafter(w[3, 7], torch.tensor(float("inf")))
    (bad,) = check(lean, [engine_sums(model, names, ["float32"] * len(names))], "e")
    assert "'0.weight'" in bad and "Σbits" in bad

    widened = engine_sums(model, names, ["bfloat16"] * len(names))  # sent as bf16, held as fp32: float sums
    assert all(p["sums"][0] is not None for p in widened["params"].values())
    (first, *_) = check({n: (s, sd[n].numel(), "bfloat16") for n, s in zip(names, bits_only)}, [widened], "e")
    assert "float sums the sender did not take" in first
    assert engine_sums(model, names)["params"]["0.bias"]["sums"][0] is not None  # no dtypes said: all sums


def test_bit_sums_of_2_byte_weights_are_word_sums_that_add_up_and_see_every_element():
    """bf16 bit sums read 4-byte words (two elements) for speed: the definition is pinned against numpy, a one-ulp
    change at an even or odd position shows, fused even pieces add up exactly, and a piece of odd length (whose
    pairs would shift its neighbours') is checked by float sums on both sides instead of failing a good push."""
    from typing import ClassVar

    import numpy as np

    from engines.vllm.fingerprint import bit_sum, check, engine_sums, tensor_sums

    g = torch.Generator().manual_seed(2)
    t = torch.randn(7, 5, generator=g).bfloat16()  # 35 elements: 17 words and a lone element
    raw = t.view(torch.int16).reshape(-1).numpy().astype(np.int64)
    words = raw[:34:2] & 0xFFFF | raw[1:34:2] << 16  # little-endian pairs as unsigned 32-bit words
    want = (int(words.sum()) + int(raw[34])) % 2**32
    assert int(bit_sum(t)) % 2**32 == want
    assert int(bit_sum(t[1:].reshape(-1)[1:])) % 2**32 == int(bit_sum(t[1:].reshape(-1)[1:].clone())) % 2**32
    for i in (10, 11, 34):  # low half, high half, the lone element
        nudged = t.clone().view(-1)
        nudged.view(torch.int16)[i] += 1  # one bf16 ulp
        assert int(bit_sum(nudged)) % 2**32 != want, i

    class Fused(torch.nn.Module):  # as vLLM models declare their fused loads
        packed_modules_mapping: ClassVar[dict[str, list[str]]] = {"qk": ["q", "k"], "uv": ["u", "v"]}

    q, k = torch.randn(6, 4, generator=g).bfloat16(), torch.randn(2, 4, generator=g).bfloat16()
    u, v = torch.randn(3, 3, generator=g).bfloat16(), torch.randn(1, 3, generator=g).bfloat16()  # u: odd length
    model, layer = Fused(), torch.nn.Module()
    model.layer, layer.qk, layer.uv = layer, torch.nn.Linear(4, 8, bias=False), torch.nn.Linear(3, 4, bias=False)
    layer.qk.weight.data, layer.uv.weight.data = torch.cat([q, k]), torch.cat([u, v])
    names = [f"layer.{n}.weight" for n in "qkuv"]
    dtypes = ["bfloat16", "bfloat16", None, None]  # the sender's mark (`pairs_split`): check u and v by float sums
    floats = [False, False, True, True]
    sent = {n: (s, t.numel(), "bfloat16") for n, t, s in zip(names, (q, k, u, v), tensor_sums([q, k, u, v], floats))}
    got = engine_sums(model, names, dtypes)
    assert got["params"]["layer.qk.weight"]["sums"][:2] == [None, None], got  # even pieces in their dtype: bits
    assert got["params"]["layer.uv.weight"]["sums"][0] is not None, got  # odd pieces: float sums
    assert check(sent, [got], "e") == []
    (bad,) = check(sent, [engine_sums(model, names, ["bfloat16"] * 4)], "e")  # unmarked: u's pairs shift v's
    assert "'layer.uv.weight'" in bad
    with torch.no_grad():
        layer.qk.weight.view(-1).view(torch.int16)[13] += 1
    (bad,) = check(sent, [engine_sums(model, names, dtypes)], "e")
    assert "'layer.qk.weight'" in bad and "Σbits" in bad
