"""The engine and sender halves of an ipc push, alone: `python benchmarks/bench_load_plan.py [sizes...]` (a GPU when
there is one, else the CPU; default sizes tiny 0.5b).

vLLM's Qwen2ForCausalLM is built in this process (its own weight loaders, no server) and fed the checkpoint's
tensors from a staging buffer laid out as the sender lays it out (`engines/vllm/staging.py`). Timed, medians:
- load: vLLM's `load_weights` over views of the buffer (the baseline, what every push ran) vs the recorded load
  replayed (`engines/vllm/load_plan.py`, one CUDA graph on a GPU);
- engine sums: the bit sums of the parameters one reduction per tensor (baseline) vs captured once
  (`fingerprint.graphed_bits`); on a GPU the replay sums what it writes (`summed_in_copy` parameters, checked equal);
- sender sums: one reduction per tensor (baseline) vs the staging buffer's chunked sums.
Each pair runs in the same process on the same tensors; writes benchmarks/results/load_plan_<card>.{json,png}.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    ts = []
    for _ in range(repeats + 1):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[1:])


def build(path: Path, dev: str):
    import torch
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    from vime.placement import free_port

    cfg = VllmConfig(model_config=ModelConfig(model=str(path), dtype="bfloat16"), device_config=DeviceConfig(dev))
    with set_current_vllm_config(cfg):
        if not ps.model_parallel_is_initialized():
            backend = "nccl" if dev == "cuda" else "gloo"
            ps.init_distributed_environment(1, 0, f"tcp://127.0.0.1:{free_port('127.0.0.1')}", 0, backend)
            ps.initialize_model_parallel(1, 1)
        with set_default_torch_dtype(torch.bfloat16), torch.device(dev):
            return initialize_model(vllm_config=cfg), cfg


def bench(size: str, dev: str, repeats: int) -> dict:
    import torch
    from safetensors.torch import load_file
    from vllm.config import set_current_vllm_config

    from engines.vllm.fingerprint import bit_sum, graphed_bits, stacked_bits
    from engines.vllm.load_plan import LoadPlan, record
    from engines.vllm.staging import Staging
    from engines.vllm.worker_ext import views
    from vime.models import make_model

    path = Path(os.environ.get("VIME_MODELS", "/tmp/vime_models")) / f"qwen2-{size}"
    if not (path / "config.json").exists():
        make_model("qwen2", size, path, dtype="bfloat16", device=dev)
    model, cfg = build(path, dev)
    tensors = [(n, t.to(dev, torch.bfloat16)) for n, t in sorted(load_file(path / "model.safetensors").items())]
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    st = Staging(nbytes, dev)
    st.fill(tensors)
    v = views(
        st.buffer, [n for n, _ in tensors], ["bfloat16"] * len(tensors), [list(t.shape) for _, t in tensors], st.offsets
    )

    def load() -> None:
        with set_current_vllm_config(cfg):
            model.load_weights(v)

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with torch.no_grad():
        plan = record(model, [st.buffer], load)
        assert isinstance(plan, LoadPlan), plan
        params = [p.detach() for p in model.parameters()]
        row = {
            "size": size,
            "tensors": len(tensors),
            "bytes": nbytes,
            "params": len(params),
            "load_weights_s": timed(load, repeats, sync),
            "replay_s": timed(plan.replay, repeats, sync),
            "engine_sums_per_tensor_s": timed(lambda: stacked_bits([bit_sum(p) for p in params]), repeats, sync),
            "engine_sums_graphed_s": timed(lambda: graphed_bits(params), repeats, sync),
            "sender_sums_per_tensor_s": timed(lambda: stacked_bits([bit_sum(t) for _, t in tensors]), repeats, sync),
            "sender_sums_chunked_s": timed(st.bit_sums, repeats, sync),
        }
        # the replay writes what load_weights writes, on new values (on a GPU: through the CUDA graph)
        st.fill([(n, t + torch.randn_like(t) * 0.01) for n, t in tensors])
        plan.replay()
        replayed = [p.clone() for p in params]
        load()
        row["replay_equals_load_weights"] = all(torch.equal(a, b) for a, b in zip(replayed, params))
        plan.replay()
        copied = plan.sums()  # what the replay's copy summed of the parameters it wrote whole
        named = dict(model.named_parameters())
        row["summed_in_copy"] = len(copied)
        row["copy_sums_equal_bit_sums"] = all(v == int(bit_sum(named[p])) % (1 << 32) for p, v in copied.items())
    assert row["replay_equals_load_weights"], f"{size}: the replayed load differs from load_weights"
    assert row["copy_sums_equal_bit_sums"], f"{size}: the sums the replay took differ from the parameters' bit sums"
    assert copied or dev != "cuda", f"{size}: on a GPU the replay's kernel sums what it writes; it summed nothing"
    assert graphed_bits(params) == stacked_bits([bit_sum(p) for p in params])
    assert st.bit_sums() == [s % (1 << 32) for s in stacked_bits([bit_sum(t) for _, t in st.views()])]
    row["replay_over_load_weights"] = row["replay_s"] / row["load_weights_s"]
    row["engine_sums_ratio"] = row["engine_sums_graphed_s"] / row["engine_sums_per_tensor_s"]
    row["sender_sums_ratio"] = row["sender_sums_chunked_s"] / row["sender_sums_per_tensor_s"]
    return row


def main() -> int:
    import torch

    from benchmarks.common import bar_png, card_slug, write

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        torch.set_num_threads(1)  # as the engine and the sender's sums run on the CPU (`cpu_threads.py`)
    sizes = sys.argv[1:] or ["tiny", "0.5b"]
    card = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    rows = []
    for size in sizes:
        rows.append(bench(size, dev, repeats=5 if size != "tiny" else 20))
        print({k: round(v, 5) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    name = f"load_plan_{card_slug()}"
    out = Path(os.environ.get("VIME_BENCH_OUT", ROOT / "benchmarks" / "results"))
    write(name, {"card": card, "rows": rows}, out)
    labels, values = [], []
    for r in rows:
        for what, base, new in (
            ("load", "load_weights", "replay"),
            ("eng. sums", "engine_sums_per_tensor", "engine_sums_graphed"),
            ("snd. sums", "sender_sums_per_tensor", "sender_sums_chunked"),
        ):
            labels += [f"{r['size']} {what}\nbaseline", f"{r['size']} {what}\nvime"]
            values += [r[f"{base}_s"] * 1e3, r[f"{new}_s"] * 1e3]
    bar_png(name, labels, values, "ms", f"ipc push halves, {card}", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
