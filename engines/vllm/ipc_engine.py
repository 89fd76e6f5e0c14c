"""vime's CUDA-IPC weight-transfer engine (`weights.backend: ipc`), registered into vLLM's factory as `vime_ipc`.

Why not vLLM's own `ipc` engine as it is: it opens one CUDA IPC handle per tensor on every push and reloads
layer by layer, which costs ~150 ms whatever the model size (see `shared/notes/gpu_anchor.md`). Here the
trainer opens ONE staging buffer at connect time; the engine maps it once, and every bucket of a push is a
`load_weights` over views of that buffer — the data never leaves the GPU and no handle is opened per push. The
trainer's resident weights (`vime.weights.mark_resident`) are not even staged: the engine maps the memory each
lies in once (`new_sources`) and loads from it in place, until the trainer stops sending from it (`drop`).

It subclasses vLLM's `IPCWeightTransferEngine`: `init_info.mode = "vllm"` switches back to the parent's exact
per-push-handle path, which the benchmark uses as the baseline on the same server. The handle is a pickle (CUDA
IPC handles carry torch types), so like vLLM's it needs `VLLM_ALLOW_INSECURE_SERIALIZATION=1`, and the engine's
RL routes must stay on loopback.
"""

from __future__ import annotations

import base64
import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor
from vllm.distributed.weight_transfer.base import WeightTransferInitInfo, WeightTransferUpdateInfo
from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine
from vllm.logger import init_logger

from engines.vllm.load_plan import LoadPlan, model_memory, record
from engines.vllm.worker_ext import views


@dataclass
class StagingInitInfo(WeightTransferInitInfo):
    mode: str = "staging"  # "staging" (vime) or "vllm" (the parent engine, per-push handles)
    handle: str | None = None  # base64 pickle of {gpu_uuid: reduce_tensor args} of the trainer's staging buffer


@dataclass
class StagingUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    offsets: list[int] | None = None  # each tensor's byte offset in its source (None: end to end in the buffer)
    # per tensor "" (the staging buffer) or the id of the trainer's memory it is read from in place (a resident
    # weight, `in_place.py`); the handles of ids new to this engine; the ids the trainer no longer sends from
    sources: list[str] | None = None
    new_sources: dict[str, str] | None = None
    drop: list[str] | None = None


def open_handle(handle_b64: str, device_index: int) -> torch.Tensor:
    """Map the trainer's buffer into this process (the GPU must be the same physical device)."""
    from vllm import envs

    if not envs.VLLM_ALLOW_INSECURE_SERIALIZATION:
        raise ValueError(
            "weights.backend=ipc needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 in the engine "
            "environment (vime sets it; keep the engine on loopback)"
        )
    handles = pickle.loads(base64.b64decode(handle_b64))
    uuid = str(torch.cuda.get_device_properties(device_index).uuid)
    if uuid not in handles:
        raise ValueError(
            f"weights.backend=ipc: this engine runs on GPU {uuid} but the trainer's buffer is on "
            f"{list(handles)}; ipc needs the engine on trainer rank 0's GPU (placement.colocate: "
            "true) — use weights.backend=nccl for separate GPUs"
        )
    args = list(handles[uuid])
    args[6] = device_index  # reduce_tensor's device slot: this process's index of that GPU
    return rebuild_cuda_tensor(*args)


logger = init_logger(__name__)
REPLAY = os.environ.get("VIME_IPC_REPLAY", "1") != "0"  # 0: every push through load_weights (the path before)
PLAIN = {"UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"}  # GPU methods that keep the loaded weight as is
DERIVING = {"MLAAttention"}  # layers that compute weights of their own from the loaded ones (W_UK/W_UV absorbed)


def post_load(model: torch.nn.Module) -> str | None:
    """Why loading this model's weights in place would not be enough, or None: a layer vLLM processes after loading
    (a quantized or fused-MoE method that may repack or pad, MLA's absorbed projections) would keep computing with
    what it derived from the old weights while its parameters, and the push's check, say new."""
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None and type(method).__name__ not in PLAIN:
            return f"{name} uses {type(method).__name__}, processed after loading"
        if type(module).__name__ in DERIVING:
            return f"{name} ({type(module).__name__}) derives weights when loaded"
    return None


class StagingIPCWeightTransferEngine(IPCWeightTransferEngine):
    init_info_cls = StagingInitInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode = "staging"
        self.buffer: torch.Tensor | None = None
        self.sources: dict[str, torch.Tensor] = {}  # the trainer's resident weights, mapped once each (flat bytes)
        self.post_load: str | None = None  # why in-place loads are not enough for this model ("" : they are)
        # per layout of a round (names, dtypes, shapes, offsets, sources): its recorded load, or why it cannot be
        # replayed
        self.plans: dict[tuple[Any, ...], LoadPlan | str] = {}
        self.replayed: LoadPlan | None = None  # the plan the last round replayed (None: it went through a loader)

    def replayed_sums(self) -> dict[str, int]:
        """The bit sums the last round's replay took of the parameters it wrote whole (`LoadPlan.sums`): what the
        push's check need not read again. Empty after a round that went through vLLM's loaders."""
        return self.replayed.sums() if self.replayed is not None else {}

    def parse_update_info(self, update_dict: dict[str, Any]) -> Any:
        if self.mode == "vllm":
            return super().parse_update_info(update_dict)
        try:
            return StagingUpdateInfo(**update_dict)
        except TypeError as e:
            raise ValueError(f"invalid update_info for the vime ipc engine: {e}") from e

    def init_transfer_engine(self, init_info: StagingInitInfo) -> None:
        self.mode = init_info.mode
        self.buffer = None
        self.sources = {}
        self.plans = {}
        if self.mode == "staging":
            if not init_info.handle:
                raise ValueError("vime ipc init_info needs `handle` (the trainer's staging buffer)")
            self.buffer = open_handle(init_info.handle, self.device.index)
        elif self.mode != "vllm":
            raise ValueError(f"vime ipc init_info.mode must be 'staging' or 'vllm', got {self.mode!r}")

    # Staging mode loads straight into the live parameters where the model needs no processing after loading
    # (plain bf16/fp16 layers): the first push of a layout through `load_weights`, recorded, the next ones by
    # replaying it (`load_plan.py`). A model that does (`post_load`) and the vLLM mode go through the parent's
    # layerwise reload, which re-runs that processing.
    def _layerwise(self) -> bool:
        if self.mode == "vllm":
            return True
        if self.post_load is None:
            self.post_load = post_load(self.model) or ""
            if self.post_load:
                logger.info("vime ipc: %s: pushes go through vLLM's layerwise reload", self.post_load)
        return bool(self.post_load)

    def start_weight_update(self) -> None:
        if self._layerwise():
            super().start_weight_update()

    def finish_weight_update(self) -> None:
        if self._layerwise():
            super().finish_weight_update()

    def receive_weights(self, update_info: Any) -> None:
        if self.mode == "vllm":
            return super().receive_weights(update_info)
        if self.buffer is None:
            raise RuntimeError("vime ipc engine not initialised: call /init_weight_transfer_engine first")
        u = update_info
        self.replayed = None
        self._map(u)
        key = (
            tuple(u.names),
            tuple(u.dtype_names),
            tuple(map(tuple, u.shapes)),
            tuple(u.offsets or ()),
            tuple(u.sources or ()),
        )
        plan = self.plans.get(key) if REPLAY else "VIME_IPC_REPLAY=0"
        if self._layerwise():
            plan = self.post_load  # the layerwise reload's own loaders, every time
        if isinstance(plan, LoadPlan) and plan.valid_for(model_memory(self.model)):
            plan.replay()
            self.replayed = plan
            return
        tensors = placed(self.buffer, self.sources, u)
        if isinstance(plan, str):  # this layout's load does more than copy: vLLM's loaders every time
            self.model.load_weights(tensors)
            return
        bases = [self.buffer, *(self.sources[i] for i in sorted(set(u.sources or ()) - {""}))]
        self.plans[key] = record(self.model, bases, lambda: self.model.load_weights(tensors))
        if isinstance(self.plans[key], str):
            logger.warning("vime ipc: pushes of this layout go through load_weights: %s", self.plans[key])

    def _map(self, u: StagingUpdateInfo) -> None:
        """Unmap the trainer memory it no longer sends from (and forget the loads that read it), map what is new."""
        if u.drop:
            gone = set(u.drop)
            for sid in gone:
                self.sources.pop(sid, None)
            self.plans = {k: p for k, p in self.plans.items() if not gone & set(k[4])}
        for sid, handle in (u.new_sources or {}).items():
            self.sources[sid] = open_handle(handle, self.device.index)
        missing = sorted({s for s in u.sources or () if s and s not in self.sources})
        if missing:
            raise ValueError(
                f"vime ipc: the push reads trainer memory {missing[:3]} this engine never mapped (it restarted "
                "since the weight channel connected?): reconnect the channel"
            )

    def shutdown(self) -> None:
        self.buffer = None
        self.sources = {}
        self.plans = {}


def placed(
    buffer: torch.Tensor, sources: dict[str, torch.Tensor], u: StagingUpdateInfo
) -> list[tuple[str, torch.Tensor]]:
    """The round's tensors where they are: views of the staging buffer, or of the trainer's memory read in place."""
    if not u.sources:
        return views(buffer, u.names, u.dtype_names, u.shapes, u.offsets)
    if u.offsets is None or len(u.offsets) != len(u.names) or len(u.sources) != len(u.names):
        raise ValueError("vime ipc update_info: `sources` needs an offset and a source per tensor")
    out: list[tuple[str, torch.Tensor]] = []
    for name, dt, shape, off, sid in zip(u.names, u.dtype_names, u.shapes, u.offsets, u.sources):
        out += views(sources[sid] if sid else buffer, [name], [dt], [shape], [off])
    return out
