"""The sender side of in-place weight transfer into SGLang servers, through SGLang's own update routes.

pause (in place, or abort) → per bucket: `/update_weights_from_distributed` beside a broadcast on SGLang's
weight-update group (nccl across GPUs, gloo on CPU), `/update_weights_from_tensor` with CUDA IPC handles
(colocated), or safetensors files then one `/update_weights_from_disk` → `/update_weight_version` → flush the
prefix cache → every server reports the version (`/model_info`) → continue. Any failure raises `WeightPushError`
and leaves the servers paused: they may hold partly updated weights and must be restarted, never resumed.

The HTTP call of a collective step is sent first and answered only after the broadcast, so it goes to a thread
and the broadcast runs here (a blocking call first would deadlock: SGLang's ranks join from the request).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import torch

from engines.sglang.client import PAUSE_MODES
from engines.sglang.pg import join_group
from vime.placement import free_port
from vime.secret import auth_headers
from vime.weights import WeightPushError, WeightsConfig

Bucket = list[tuple[str, torch.Tensor]]
GROUP = "vime_weights"


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")  # SGLang resolves it with getattr(torch, name)


def ipc_payload(bucket: Bucket) -> str:
    """What SGLang's `MultiprocessingSerializer` makes of `[(name, cuda_tensor), ...]` after its
    `monkey_patch_torch_reductions` (a pickle of CUDA IPC handles, the device named by its UUID so the server
    maps it whatever its CUDA_VISIBLE_DEVICES), base64-encoded."""
    from multiprocessing.reduction import ForkingPickler

    from torch.multiprocessing import reductions

    class Pickler(ForkingPickler):
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, torch.Tensor) and obj.is_cuda:
                fn, args = reductions.reduce_tensor(obj)
                args = list(args)
                args[6] = str(torch.cuda.get_device_properties(args[6]).uuid)  # the device index slot
                return fn, tuple(args)
            return NotImplemented

    buf = io.BytesIO()
    Pickler(buf).dump([(n, t.detach().contiguous()) for n, t in bucket])
    return base64.b64encode(buf.getvalue()).decode()


class SGLangWeightChannel:
    def __init__(self, cfg: WeightsConfig | dict[str, Any], urls: list[str], *, master_address: str = "127.0.0.1"):
        self.cfg = cfg if isinstance(cfg, WeightsConfig) else WeightsConfig(**cfg)
        if self.cfg.pause_mode not in PAUSE_MODES:
            raise WeightPushError(f"weights.pause_mode={self.cfg.pause_mode!r}: SGLang offers {sorted(PAUSE_MODES)}")
        self.urls = list(urls)
        self.master_address = master_address
        self.http = httpx.Client(timeout=self.cfg.timeout_s, headers=auth_headers())
        self.pool = ThreadPoolExecutor(max(4, len(self.urls) * 2))
        self.pg: Any = None
        self.connected = False

    # ---- control plane ---------------------------------------------------------------------------------
    def _post(self, url: str, path: str, body: Any = None) -> Any:
        try:
            r = self.http.post(url + path, json=body if body is not None else {})
        except httpx.HTTPError as e:
            raise WeightPushError(f"{url}{path}: {type(e).__name__}: {e}") from e
        try:
            data = r.json() if r.content else None
        except ValueError:
            data = r.text
        if r.status_code >= 400 or (isinstance(data, dict) and data.get("success") is False):
            raise WeightPushError(f"{url}{path} -> {r.status_code}: {str(data)[:400]}")
        return data

    def _fire(self, path: str, body: Any = None, bodies: list[Any] | None = None) -> list[Future]:
        return [self.pool.submit(self._post, u, path, bodies[i] if bodies else body) for i, u in enumerate(self.urls)]

    def _wait(self, futs: list[Future]) -> list[Any]:
        return [f.result(timeout=self.cfg.timeout_s) for f in futs]

    def connect(self) -> None:
        backend = self.cfg.backend
        if backend in ("nccl", "ipc") and not torch.cuda.is_available():
            raise WeightPushError(
                f"weights.backend={backend!r} needs a CUDA GPU in the trainer process; use gloo or disk on CPU"
            )
        if backend in ("gloo", "nccl"):
            port = free_port(self.master_address)
            world = 1 + len(self.urls)  # one rank per server (tensor-parallel servers: rank_offset grows by tp)
            futs = self._fire(
                "/init_weights_update_group",
                bodies=[
                    {
                        "master_address": self.master_address,
                        "master_port": port,
                        "rank_offset": 1 + i,
                        "world_size": world,
                        "group_name": GROUP,
                        "backend": backend,
                    }
                    for i in range(len(self.urls))
                ],
            )
            try:
                self.pg = join_group(backend, self.master_address, port, world, 0, GROUP, self.cfg.timeout_s)
            except Exception as e:
                raise WeightPushError(f"SGLang weight-update group did not form: {type(e).__name__}: {e}") from e
            self._wait(futs)
        self.connected = True

    # ---- data plane ------------------------------------------------------------------------------------
    def _send_broadcast(self, bucket: Bucket) -> int:
        body = {
            "names": [n for n, _ in bucket],
            "dtypes": [dtype_name(t) for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": GROUP,
            "flush_cache": False,
        }
        futs = self._fire("/update_weights_from_distributed", body)
        on = "cuda" if self.cfg.backend == "nccl" else "cpu"
        for _, t in bucket:
            torch.distributed.broadcast(t.detach().to(on).contiguous(), src=0, group=self.pg)
        if on == "cuda":
            torch.cuda.synchronize()
        self._wait(futs)
        return sum(t.numel() * t.element_size() for _, t in bucket)

    def _send_ipc(self, bucket: Bucket) -> int:
        on_gpu = [(n, t.detach().to("cuda").contiguous()) for n, t in bucket]  # alive until every server answers
        torch.cuda.synchronize()
        body = {"serialized_named_tensors": [ipc_payload(on_gpu)], "flush_cache": False}
        self._wait(self._fire("/update_weights_from_tensor", body))
        return sum(t.numel() * t.element_size() for _, t in on_gpu)

    def _send_disk(self, buckets: Iterable[Bucket], version: str) -> int:
        from safetensors.torch import save_file

        folder = tempfile.mkdtemp(prefix=f"vime-{uuid.uuid4().hex[:8]}-", dir=self.cfg.disk_dir)
        try:
            nbytes = 0
            for i, bucket in enumerate(buckets):
                path = os.path.join(folder, f"model-{i:05d}.safetensors")
                save_file({n: t.detach().cpu().contiguous() for n, t in bucket}, path)
                nbytes += os.path.getsize(path)
            self._wait(self._fire("/update_weights_from_disk", {"model_path": folder, "flush_cache": False}))
            return nbytes
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _flush(self, wait_s: float) -> bool:
        """SGLang flushes its prefix cache only when idle: True once every server has flushed."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._wait(self._fire("/flush_cache"))
                return True
            except WeightPushError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.2)

    def push(self, buckets: Iterable[Bucket], version: str) -> dict[str, float]:
        if not self.connected:
            self.connect()
        t0 = time.perf_counter()
        nbytes = 0
        kept = self.cfg.pause_mode == "keep"
        try:
            self._wait(self._fire("/pause_generation", {"mode": PAUSE_MODES[self.cfg.pause_mode]}))
            t_pause = time.perf_counter()
            if self.cfg.backend == "disk":
                nbytes = self._send_disk(buckets, version)
            else:
                send = self._send_ipc if self.cfg.backend == "ipc" else self._send_broadcast
                for bucket in buckets:
                    nbytes += send(bucket)
            self._wait(self._fire("/update_weight_version", {"new_version": version, "abort_all_requests": False}))
            # the prefix cache computed with the old weights goes now, unless requests kept in place hold the
            # scheduler: then once they finish (below). Until then a prefix cached before the push may serve a
            # new request; `--disable-radix-cache` rules that out for asynchronous runs.
            flushed = self._flush(0.0 if kept else self.cfg.timeout_s)
            if not flushed and not kept:
                raise WeightPushError("SGLang servers did not flush their prefix cache with nothing running")
            t_sent = time.perf_counter()
            got = [self.http.get(u + "/model_info").json()["weight_version"] for u in self.urls]
            if any(v != version for v in got):
                raise WeightPushError(f"engines report weight versions {got} after pushing {version!r}")
        except WeightPushError:
            raise
        except Exception as e:  # a broken broadcast, a timeout, a dead engine
            raise WeightPushError(f"weight push of version {version!r} failed: {type(e).__name__}: {e}") from e
        self._wait(self._fire("/continue_generation", {}))
        if not flushed:
            self.pool.submit(self._flush, self.cfg.timeout_s)
        t1 = time.perf_counter()
        return {
            "push_s": t1 - t0,
            "pause_s": t_pause - t0,
            "transfer_s": t_sent - t_pause,
            "bytes": float(nbytes),
            "mb_per_s": nbytes / 1e6 / max(1e-9, t_sent - t_pause),
            "flush_deferred": float(not flushed),
        }

    def close(self) -> None:
        if self.pg is not None:
            for u in self.urls:
                try:
                    self.http.post(u + "/destroy_weights_update_group", json={"group_name": GROUP}, timeout=10)
                except httpx.HTTPError:
                    pass
            torch.distributed.destroy_process_group(self.pg)
            self.pg = None
        self.connected = False
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()
