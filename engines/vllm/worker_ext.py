"""Runs inside each vLLM worker process (`--worker-extension-cls engines.vllm.worker_ext.VimeWorkerExtension`).

Importing this module registers vime's weight-transfer engines into vLLM's own factory, so they are driven by
vLLM's standard RL routes (`/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`,
`/finish_weight_update`) exactly like the built-in `nccl`/`ipc` engines:

- `gloo`: a broadcast over a stateless gloo group (the CPU counterpart of vLLM's `nccl` engine);
- `disk`: each bucket as a safetensors file (e.g. on /dev/shm), for any platform;
- `vime_ipc` (`weights.backend: ipc`, GPU): one CUDA-IPC staging buffer mapped once (`ipc_engine.py`).

vLLM's own `nccl` engine serves `weights.backend: nccl` unchanged. As in vLLM's engines, each class also holds its
trainer's side (`trainer_send_weights`), which `weight_channel.py` calls in the trainer's process.

Both load through vLLM's layerwise-reload lifecycle and then fix what the CPU backend pre-packed at start-up and
the reload never rebuilds: the tied lm_head and MoE experts (without it log-probs are off by nats after a push).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from engines.vllm.cpu_threads import one_thread
from engines.vllm.delta import FULL, Base, apply, bit_sum, typed, wire_bytes


def refresh_tied_lm_head(model: torch.nn.Module) -> int:
    """Re-run the embedding quant method's post-load processing on modules that keep a pre-packed copy
    (`cpu_linear`) of their weight; returns how many were refreshed."""
    n = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is None or not hasattr(module, "cpu_linear"):
            continue
        if type(method).__name__ == "UnquantizedEmbeddingMethod":
            method.process_weights_after_loading(module)
            n += 1
    return n


def pack(tensors: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The tensors' bytes end to end in one flat buffer: what `views` cuts up again on the engine side."""
    return torch.cat([t.detach().contiguous().cpu().view(-1).view(torch.uint8) for _, t in tensors])


def views(
    buf: torch.Tensor,
    names: list[str],
    dtype_names: list[str],
    shapes: list[list[int]],
    offsets: list[int] | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """The tensors in `buf`, end to end or at the given byte offsets (the ipc staging buffer's aligned layout)."""
    out, off = [], 0
    for i, (name, dt, shape) in enumerate(zip(names, dtype_names, shapes)):
        dtype = getattr(torch, dt)
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        off = offsets[i] if offsets is not None else off
        out.append((name, typed(buf[off : off + nbytes], dtype).view(shape)))
        off += nbytes
    return out


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 300.0


@dataclass
class TensorsUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    path: str | None = None  # disk backend: the safetensors file holding these tensors
    # delta pushes (gloo, `delta.py`): per tensor FULL or the number of (index, value) pairs on the wire, the new
    # tensor's exact bit sum, the version the deltas are against, and whether to keep the tensors as the next base
    counts: list[int] | None = None
    checks: list[int] | None = None
    base: str | None = None
    keep: bool = False


HELD = Base()  # this worker's copy of the last pushed tensors (delta pushes); one model per worker process


def rebuild(buf: torch.Tensor, u: TensorsUpdateInfo) -> list[tuple[str, torch.Tensor]]:
    """The bucket's new tensors from a delta push's bytes: whole ones as they came, deltas applied to the kept
    base; each checked bit-exactly against the sender's sum."""
    assert u.counts is not None and u.checks is not None
    out, off = [], 0
    for name, dt, shape, count, check in zip(u.names, u.dtype_names, u.shapes, u.counts, u.checks):
        dtype = getattr(torch, dt)
        numel = int(torch.Size(shape).numel())
        part = buf[off : off + wire_bytes(count, numel, torch.empty((), dtype=dtype).element_size())]
        off += part.numel()
        if count == FULL:
            t = typed(part, dtype).view(shape)
        else:
            held = HELD.tensors.get(name)
            if held is None or u.base is None or u.base != HELD.against:
                raise RuntimeError(
                    f"delta for {name!r} is against version {u.base!r}, but this worker holds "
                    f"{HELD.against if held is not None else None!r} for it: the sender must push in full"
                )
            apply(held, part, count)
            t = held.view(shape)
        got = bit_sum(t)
        if got != check:
            raise RuntimeError(
                f"delta push: {name!r} rebuilt against version {u.base!r} has bit sum {got}, the sender's is "
                f"{check}: the engine's base differs from the sender's"
            )
        if u.keep and count == FULL:
            HELD.keep(name, t)
        out.append((name, t))
    return out


def refresh_cpu_experts(model: torch.nn.Module) -> int:
    """Re-pack the CPU backend's MoE experts; returns how many layers were refreshed. On a reload vLLM copies the
    new expert weights into the parameters in their loaded layout but runs the CPU kernel's pre-packing only at
    start-up (`_setup_kernel`: first call only), so without this the experts compute with mis-packed weights
    (log-probs off by nats after a push)."""
    n = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and "CPU" in type(experts).__name__:
            experts.process_weights_after_loading(module)
            n += 1
    return n


@dataclass
class DiskInitInfo(WeightTransferInitInfo):
    pass


class _ReloadingEngine(WeightTransferEngine):
    """Shared lifecycle: layerwise reload around the received tensors, lm_head refresh at the end."""

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        HELD.against, HELD.version = HELD.version, None  # a whole version again only once a push commits it
        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        refresh_tied_lm_head(self.model)
        refresh_cpu_experts(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on CPU; our receives are
        # synchronous already.
        self.receive_weights(self.parse_update_info(update_info))


def gloo_group(host: str, port: int, rank: int, world: int, timeout_s: float, **kw: Any) -> Any:
    """vLLM's stateless gloo group; its `timeout` argument came with vLLM 0.27 (0.26, the GPU line, keeps gloo's
    30 min default — the HTTP timeout still bounds a push)."""
    import inspect

    from vllm.distributed.utils import stateless_init_torch_distributed_process_group as init

    if "timeout" in inspect.signature(init).parameters:
        kw["timeout"] = timedelta(seconds=timeout_s)
    return init(host, port, rank, world, backend="gloo", **kw)


class GlooWeightTransferEngine(_ReloadingEngine):
    init_info_cls = GlooInitInfo
    update_info_cls = TensorsUpdateInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pg = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self.pg = gloo_group(
            init_info.master_address, init_info.master_port, rank, init_info.world_size, init_info.timeout_s
        )

    def receive_weights(self, u: TensorsUpdateInfo) -> None:
        if self.pg is None:
            raise RuntimeError("gloo weight transfer not initialised: call /init_weight_transfer_engine first")
        counts = u.counts if u.counts is not None else [FULL] * len(u.names)  # a plain push: every tensor whole
        nbytes = sum(
            wire_bytes(c, int(torch.Size(s).numel()), torch.empty((), dtype=getattr(torch, d)).element_size())
            for c, s, d in zip(counts, u.shapes, u.dtype_names)
        )
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.pg.broadcast(buf, root=0).wait()
        if u.counts is None:
            if HELD.tensors:  # a sender without delta: nothing kept stays valid
                HELD.tensors.clear()
            self.model.load_weights(views(buf, u.names, u.dtype_names, u.shapes))
        else:
            self.model.load_weights(rebuild(buf, u))

    @staticmethod
    def trainer_send_weights(iterator: Iterator[tuple[str, torch.Tensor]], trainer_args: dict[str, Any]) -> None:
        """The trainer's side (rank 0 of `trainer_args["group"]`): one packed broadcast per bucket. Packed on one
        thread: the engines busy-spin while they wait for it, and torch's two-thread copy then took ~90 ms for the
        tiny model's 0.7 MB instead of 0.1 ms (`cpu_threads.py`)."""
        tensors = list(iterator)
        with one_thread(all(t.device.type == "cpu" for _, t in tensors)):
            data = pack(tensors)
        trainer_args["group"].broadcast(data, root=0).wait()

    def shutdown(self) -> None:
        self.pg = None


class DiskWeightTransferEngine(_ReloadingEngine):
    init_info_cls = DiskInitInfo
    update_info_cls = TensorsUpdateInfo

    def init_transfer_engine(self, init_info: DiskInitInfo) -> None:
        pass

    def receive_weights(self, u: TensorsUpdateInfo) -> None:
        from safetensors.torch import load_file

        if not u.path:
            raise ValueError("disk weight update needs update_info.path (a safetensors file)")
        tensors = load_file(u.path)
        self.model.load_weights([(n, tensors[n]) for n in u.names])

    @staticmethod
    def trainer_send_weights(iterator: Iterator[tuple[str, torch.Tensor]], trainer_args: dict[str, Any]) -> None:
        """The trainer's side: the bucket as one safetensors file at `trainer_args["path"]`."""
        from safetensors.torch import save_file

        save_file({n: t.detach().contiguous().cpu() for n, t in iterator}, trainer_args["path"])

    def shutdown(self) -> None:
        pass


for _name, _cls in (("gloo", GlooWeightTransferEngine), ("disk", DiskWeightTransferEngine)):
    if _name not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(_name, _cls)
if "vime_ipc" not in WeightTransferEngineFactory._registry:  # CUDA only: loaded when a server asks for it
    WeightTransferEngineFactory.register_engine("vime_ipc", "engines.vllm.ipc_engine", "StagingIPCWeightTransferEngine")


class VimeWorkerExtension:
    """Methods callable through `/collective_rpc` on every worker."""

    model_runner: Any  # set by vLLM's worker this class is mixed into
    vllm_config: Any
    start_weight_update: Any  # vLLM's worker methods behind /start_weight_update, /update_weights, ...
    update_weights: Any
    finish_weight_update: Any

    def vime_update(
        self,
        update_info: dict[str, Any],
        start: bool,
        finish: bool,
        sums: list[str] | None = None,
        sum_dtypes: list[str | None] | None = None,
        read_back: bool = False,
    ) -> dict[str, Any]:
        """One round of a push (`push_route.py` calls it): the worker's own start / update / finish of vLLM's
        weight-transfer session (what the RL routes call one by one), and after the last round the sums the
        push is checked by; with the seconds the load (start to finish) and the sums took. A push of one round
        that replayed a recorded load (ipc) has the sums of what it wrote whole from the copy itself; the rest,
        and everything with `read_back`, is read from the parameters."""
        t = time.perf_counter()
        if start:
            self.start_weight_update()
        self.update_weights(update_info)
        if finish:
            self.finish_weight_update()
        load_s = time.perf_counter() - t
        if sums is None:
            return {"load_s": load_s}
        t = time.perf_counter()
        engine: Any = getattr(self, "weight_transfer_engine", None)  # vLLM's worker holds the session's engine
        one_round = start and finish and not read_back
        copied = engine.replayed_sums() if one_round and hasattr(engine, "replayed_sums") else {}
        from engines.vllm.fingerprint import engine_sums

        answer = engine_sums(self.model_runner.get_model(), sums, sum_dtypes, copied)
        took = {"load_s": load_s, "sum_s": time.perf_counter() - t, "summed_in_copy": len(copied)}
        return answer | took | {"dp": self.vllm_config.parallel_config.data_parallel_index}

    def vime_workers(self) -> dict[str, Any]:
        """How this worker's server is laid out: the weight channel gives each server as many ranks of its group as
        it has workers (TP x PP per data-parallel engine, times the engines the server runs)."""
        pc = self.vllm_config.parallel_config
        external, hybrid = (getattr(pc, f"data_parallel_{k}_lb", False) for k in ("external", "hybrid"))
        lb = "external" if external else "hybrid" if hybrid else "internal"
        return {
            "world_size": pc.world_size,
            "data_parallel_size": pc.data_parallel_size,
            "data_parallel_index": pc.data_parallel_index,
            "lb": lb,
        }

    def vime_routes_on(self) -> bool:
        """Start recording the experts every token is routed to (idempotent; per server process)."""
        if getattr(self, "_vime_routes", None) is None:
            from engines.vllm.r3_capture import RouteRecorder

            self._vime_routes = RouteRecorder(self.model_runner, self.vllm_config)
        return True

    def vime_routes_take(self, tag: str) -> dict[str, Any] | None:
        """The recorded routes of a finished request's children (None: recording is off, e.g. after a restart)."""
        rec = getattr(self, "_vime_routes", None)
        return None if rec is None else rec.take(tag)

    def vime_refresh_tied_lm_head(self) -> int:
        return refresh_tied_lm_head(self.model_runner.get_model())

    def vime_weight_sums(self, names: list[str], dtypes: list[str | None] | None = None) -> dict[str, Any]:
        """Where each pushed tensor landed and the sums of those parameters (`fingerprint.py`: every push is
        checked against what the sender sent; `dtypes`, what each was sent as, spares the float sums)."""
        from engines.vllm.fingerprint import engine_sums

        dp = self.vllm_config.parallel_config.data_parallel_index
        return engine_sums(self.model_runner.get_model(), names, dtypes) | {"dp": dp}

    def vime_delta_version(self) -> str | None:
        """The version this worker's kept base makes up (None: none, or a push since did not commit)."""
        return HELD.version

    def vime_delta_commit(self, version: str) -> int:
        """The push that kept its tensors finished and verified: they are version `version`'s base now."""
        HELD.version = version
        return len(HELD.tensors)
