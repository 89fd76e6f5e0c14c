"""The sender side of the weight-transfer channel, driving vLLM's RL routes over HTTP.

One control flow for every backend: pause (vLLM's level-0 sleep) → per bucket one `/collective_rpc vime_update`
(vLLM's own worker start/update/finish of the weight-transfer session, with the backend's data plane: a gloo or
NCCL broadcast, a CUDA-IPC staging buffer, a safetensors file; the last bucket also returns the engines' weight
sums) → the version (vLLM >= 0.27) → prefix-cache reset → verify → resume. A push is latency-bound, so control
round trips are what it costs: a one-bucket push makes four short ones, where the routes one by one made seven
and `/pause` alone costs 20 ms. It runs in the process that holds the tensors (trainer
rank 0, or a test's transformers model). Any failure raises `WeightPushError` and leaves the engines paused: they
may hold half-updated weights and must be restarted and re-synced, never resumed.
"""

from __future__ import annotations

import base64
import os
import pickle
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import torch

from engines.vllm.cpu_threads import one_thread
from engines.vllm.delta import Base, encode
from engines.vllm.fingerprint import check, dtype_name, float_checked, tensor_sums
from engines.vllm.server import vllm_version
from vime.placement import free_port, listening_socket
from vime.secret import auth_headers
from vime.weights import WeightPushError, WeightsConfig

Bucket = list[tuple[str, torch.Tensor]]

# weights.backend -> the engine name the vLLM servers are started with (`--weight-transfer-config`)
VLLM_ENGINE_NAMES = {"gloo": "gloo", "disk": "disk", "nccl": "nccl", "ipc": "vime_ipc"}


def marked(buckets: Iterable[Bucket]) -> Iterator[tuple[Bucket, bool, bool]]:
    """Each bucket with whether it is the first and the last (one look ahead: buckets are often streamed)."""
    it = iter(buckets)
    cur = next(it, None)
    first = True
    while cur is not None:
        nxt = next(it, None)
        yield cur, first, nxt is None
        cur, first = nxt, False


def bucket_meta(bucket: Bucket) -> dict[str, Any]:
    return {
        "names": [n for n, _ in bucket],
        "dtype_names": [dtype_name(t) for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
    }


class VLLMWeightChannel:
    def __init__(
        self,
        cfg: WeightsConfig | dict[str, Any],
        urls: list[str],
        *,
        master_address: str = "127.0.0.1",
        workers_per_engine: int = 1,
        new_finish_api: bool | None = None,
    ):
        self.cfg = cfg if isinstance(cfg, WeightsConfig) else WeightsConfig(**cfg)
        self.urls = list(urls)
        self.master_address = master_address
        self.workers_per_engine = workers_per_engine
        # vLLM >= 0.27 takes weight_version in /finish_weight_update and reports it in /weight_info
        self.new_finish_api = vllm_version() >= (0, 27, 0) if new_finish_api is None else new_finish_api
        self.http = httpx.Client(timeout=self.cfg.timeout_s, headers=auth_headers())
        self.pool = ThreadPoolExecutor(max(4, len(self.urls) * 2))
        self.pg: Any = None  # gloo process group / NCCL communicator
        self.staging: torch.Tensor | None = None  # ipc: the buffer engines map once
        self.connected = False
        self.sent: dict[str, tuple[list[float], int, str]] = {}  # this push's tensors: sums, numel, dtype
        self.sum_s = 0.0  # time spent summing them
        self.names: list[str] = []  # this push's tensor names so far (the last bucket asks the engines' sums)
        self.dtypes: list[str] = []  # and the dtypes they were sent as
        # names the engines check by float sums (a dtype change, row sums read back); None: not known yet (all).
        # The rest are checked by their exact bit sums alone, which is all either side then computes.
        self.float_names: set[str] | None = None
        self.engine_sums: list[Any] | None = None  # every engine's answer to that
        self.timeline: dict[str, float] = {}  # seconds per control call of this push (summed over buckets)
        if self.cfg.delta and self.cfg.backend != "gloo":
            raise ValueError(
                f"weights.delta: true needs weights.backend: gloo (delta pushes are built on the gloo channel), "
                f"got backend {self.cfg.backend!r}"
            )
        self.base = Base()  # delta: what the engines hold, as this side last pushed it
        self.against: str | None = None  # delta: this push's base version (None: a full push)
        self.delta_stats = {"elements": 0, "changed": 0, "full_bytes": 0}

    # ---- control plane ---------------------------------------------------------------------------------
    def _post(self, url: str, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        try:
            r = self.http.post(url + path, json=json, params=params)
        except httpx.HTTPError as e:
            raise WeightPushError(f"{url}{path}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            raise WeightPushError(f"{url}{path} -> {r.status_code}: {r.text[:400]}")
        return r.json() if r.content else None

    def _all(
        self, path: str, json: Any = None, params: dict[str, Any] | None = None, label: str | None = None
    ) -> list[Any]:
        t0 = time.perf_counter()
        futs = [self.pool.submit(self._post, u, path, json, params) for u in self.urls]
        out = [f.result(timeout=self.cfg.timeout_s) for f in futs]
        self._took(label or path.strip("/"), t0)
        return out

    def _took(self, phase: str, t0: float) -> None:
        self.timeline[phase] = self.timeline.get(phase, 0.0) + time.perf_counter() - t0

    def _update(self, meta: dict[str, Any], first: bool, last: bool) -> list[Future[Any]]:
        """Every engine loads one bucket (`vime_update`: vLLM's start/update/finish in one round trip); the last
        one also answers the sums that verify this push."""
        self.names += meta["names"]
        self.dtypes += meta["dtype_names"]
        kwargs = {"update_info": meta, "start": first, "finish": last}
        if last and self.cfg.verify:
            kwargs |= {"sums": self.names, "sum_dtypes": self.dtypes}
        body = {"method": "vime_update", "kwargs": kwargs}
        return [self.pool.submit(self._post, u, "/collective_rpc", body) for u in self.urls]

    def _landed(self, futs: list[Future[Any]], last: bool, t0: float) -> None:
        try:
            answers = [f.result(timeout=self.cfg.timeout_s) for f in futs]
        except WeightPushError as e:
            if "vime_update" in str(e):  # a server started without vime's worker extension
                raise WeightPushError(
                    f"{e} — vime's weight channel needs its worker extension on every vLLM server "
                    "(--worker-extension-cls engines.vllm.worker_ext.VimeWorkerExtension; vime-started servers have it)"
                ) from e
            raise
        if last and self.cfg.verify:
            self.engine_sums = answers
        self._took("update", t0)

    def connect(self) -> None:
        backend = self.cfg.backend
        if backend in ("nccl", "ipc") and not torch.cuda.is_available():
            raise WeightPushError(
                f"weights.backend={backend!r} needs a CUDA GPU in the trainer process; use gloo or disk on CPU"
            )
        if backend in ("gloo", "nccl"):
            self._connect_broadcast(backend)
        elif backend == "ipc":
            self._connect_ipc()
        else:
            self._all("/init_weight_transfer_engine", {"init_info": {}})
        self.connected, self.float_names = True, None

    def _connect_broadcast(self, backend: str) -> None:
        """One group: the sender is rank 0, every engine worker joins at its rank offset."""
        sock = listening_socket(self.master_address) if backend == "gloo" else None  # the store binds no more
        port = sock.getsockname()[1] if sock is not None else free_port(self.master_address)
        world = 1 + self.workers_per_engine * len(self.urls)
        extra = {"timeout_s": self.cfg.timeout_s} if backend == "gloo" else {}
        futs = [
            self.pool.submit(
                self._post,
                u,
                "/init_weight_transfer_engine",
                {
                    "init_info": {
                        "master_address": self.master_address,
                        "master_port": port,
                        "world_size": world,
                        "rank_offset": 1 + i * self.workers_per_engine,
                        **extra,
                    }
                },
            )
            for i, u in enumerate(self.urls)
        ]
        if backend == "gloo":
            from engines.vllm.worker_ext import gloo_group

            self.pg = gloo_group(self.master_address, port, 0, world, self.cfg.timeout_s, listen_socket=sock)
        else:  # vLLM's own NCCL engine, trainer side
            from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

            self.pg = NCCLWeightTransferEngine.trainer_init(
                {"master_address": self.master_address, "master_port": port, "world_size": world}
            )
        for f in futs:
            f.result(timeout=self.cfg.timeout_s)

    def _connect_ipc(self) -> None:
        """Allocate the staging buffer once and let every engine (on this GPU) map it."""
        from torch.multiprocessing.reductions import reduce_tensor

        self.staging = torch.empty(self.cfg.bucket_mb << 20, dtype=torch.uint8, device="cuda")
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        handle = base64.b64encode(pickle.dumps({uuid: reduce_tensor(self.staging)[1]})).decode()
        self._all("/init_weight_transfer_engine", {"init_info": {"mode": "staging", "handle": handle}})

    # ---- data plane ------------------------------------------------------------------------------------
    def _record(self, bucket: Bucket) -> None:
        """The bucket's fingerprints for `verify`, summed where the tensors are while the engines load them."""
        if not self.cfg.verify:
            return
        t0 = time.perf_counter()
        floats = [self.float_names is None or n in self.float_names for n, _ in bucket]
        for (name, t), sums in zip(bucket, tensor_sums([t.detach() for _, t in bucket], floats)):
            self.sent[name] = (sums, t.numel(), dtype_name(t))
        self.sum_s += time.perf_counter() - t0

    def _delta_bucket(self, bucket: Bucket, meta: dict[str, Any]) -> tuple[dict[str, Any], Bucket]:
        """What a delta push sends for one bucket: per tensor its changed elements against the base the engines
        hold (or the whole tensor), and the tensors become the next base."""
        counts, checks, wire = [], [], []
        with one_thread(all(t.device.type == "cpu" for _, t in bucket)):
            for name, t in bucket:
                enc = encode(t, self.base.tensors.get(name) if self.against is not None else None)
                counts.append(enc.count)
                checks.append(enc.check)
                wire += [(name, p) for p in enc.payload]
                self.delta_stats["elements"] += t.numel()
                self.delta_stats["changed"] += enc.changed
                self.delta_stats["full_bytes"] += t.numel() * t.element_size()
                self.base.keep(name, t)
        return {**meta, "counts": counts, "checks": checks, "base": self.against, "keep": True}, wire

    def _delta_base(self) -> str | None:
        """The version a delta can be against: the one this side last pushed, if every engine worker holds it."""
        if self.base.version is None:
            return None
        answers = self._all("/collective_rpc", {"method": "vime_delta_version"})
        held = {v for a in answers for v in a["results"]}
        return self.base.version if held == {self.base.version} else None

    def _send_bucket(self, bucket: Bucket, first: bool, last: bool) -> int:
        if self.cfg.backend == "ipc":  # describes each round itself (a bucket may not fit the buffer at once)
            return self._send_ipc(bucket, first, last)
        t0 = time.perf_counter()
        meta = bucket_meta(bucket)
        wire = bucket
        if self.cfg.delta:
            meta, wire = self._delta_bucket(bucket, meta)
        if self.cfg.backend in ("gloo", "nccl"):  # engines block in the update until the broadcast lands
            futs = self._update({**meta, "packed": True} if self.cfg.backend == "nccl" else meta, first, last)
            nbytes = sum(t.numel() * t.element_size() for _, t in wire)
            if self.cfg.backend == "gloo":
                from engines.vllm.worker_ext import GlooWeightTransferEngine

                GlooWeightTransferEngine.trainer_send_weights(iter(wire), {"group": self.pg})
            else:
                from vllm.distributed.weight_transfer.nccl_engine import (
                    NCCLTrainerSendWeightsArgs,
                    NCCLWeightTransferEngine,
                )

                NCCLWeightTransferEngine.trainer_send_weights(
                    iter([(n, t.detach().contiguous()) for n, t in bucket]),
                    NCCLTrainerSendWeightsArgs(group=self.pg, packed=True),
                )
                torch.cuda.synchronize()
            self._record(bucket)
            self._landed(futs, last, t0)
            return nbytes
        from engines.vllm.worker_ext import DiskWeightTransferEngine

        path = os.path.join(self.cfg.disk_dir, f"vime-{uuid.uuid4().hex}.safetensors")
        DiskWeightTransferEngine.trainer_send_weights(iter(bucket), {"path": path})
        try:
            futs = self._update({**meta, "path": path}, first, last)
            self._record(bucket)
            self._landed(futs, last, t0)
            return os.path.getsize(path)
        finally:
            os.unlink(path)

    def _send_ipc(self, bucket: Bucket, first: bool, last: bool) -> int:
        """Copy tensors into the staging buffer (device to device) and have the engines load views of it;
        a bucket larger than the buffer goes in several rounds."""
        assert self.staging is not None
        cap, sent, off = self.staging.numel(), 0, 0
        part: Bucket = []
        t0 = time.perf_counter()
        for name, t in [*bucket, ("", None)]:  # a sentinel flushes the last round
            nbytes = 0 if t is None else t.numel() * t.element_size()
            if nbytes > cap:
                raise WeightPushError(
                    f"tensor {name} ({nbytes >> 20} MiB) is larger than the ipc staging buffer "
                    f"({cap >> 20} MiB): raise weights.bucket_mb"
                )
            if part and (t is None or off + nbytes > cap):
                torch.cuda.synchronize()
                self._took("copy", t0)
                t0, final = time.perf_counter(), last and t is None
                futs = self._update(bucket_meta(part), first, final)
                self._record(part)  # summed on the GPU while the engines load the round
                self._landed(futs, final, t0)
                sent, off, part, first, t0 = sent + off, 0, [], False, time.perf_counter()
            if t is not None:
                self.staging[off : off + nbytes].copy_(t.detach().contiguous().view(-1).view(torch.uint8))
                part.append((name, t))
                off += nbytes
        return sent

    def push(self, buckets: Iterable[Bucket], version: str) -> dict[str, float]:
        if not self.connected:
            self.connect()
        t0 = time.perf_counter()
        nbytes, self.sent, self.sum_s, self.engine_sums, self.timeline = 0, {}, 0.0, None, {}
        self.names, self.dtypes = [], []
        self.delta_stats = dict.fromkeys(self.delta_stats, 0)
        try:
            # vLLM's level-0 sleep is its pause without the 20 ms asyncio.sleep `/pause` ends with (and without its
            # cache clearing, done below once the weights are in); `/wake_up?tags=scheduling` is its resume
            self._all("/sleep", params={"level": 0, "mode": self.cfg.pause_mode}, label="pause")
            t_pause = time.perf_counter()
            if self.cfg.delta:
                self.against, self.base.version = self._delta_base(), None  # the base changes as buckets go
            for bucket, first, last in marked(buckets):
                nbytes += self._send_bucket(bucket, first, last)
            if not self.names:
                raise WeightPushError(f"weight push of version {version!r} has no tensors")
            if self.new_finish_api:  # vLLM >= 0.27 keeps the version in the engine (0.26: the client does)
                self._all("/update_weight_version", {"new_version": version})
            self._reset_prefix_cache()
            t_sent = time.perf_counter()
            if self.cfg.verify:
                self.verify(version, self.engine_sums)
            t_verified = time.perf_counter()
            if self.new_finish_api:
                got = [self.http.get(u + "/weight_info").json()["weight_version"] for u in self.urls]
                if any(v != version for v in got):
                    raise WeightPushError(f"engines report weight versions {got} after pushing {version!r}")
            if self.cfg.delta:  # verified: what both sides kept is this version's base
                self._all("/collective_rpc", {"method": "vime_delta_commit", "kwargs": {"version": version}})
                self.base.version = version
        except WeightPushError:
            raise
        except Exception as e:  # a broken broadcast, a timeout, a dead engine
            raise WeightPushError(f"weight push of version {version!r} failed: {type(e).__name__}: {e}") from e
        self._all("/wake_up", params={"tags": "scheduling"}, label="resume")
        t1 = time.perf_counter()
        return {
            **{f"phase/{k}_s": v for k, v in self.timeline.items()},
            "push_s": t1 - t0,
            "pause_s": t_pause - t0,
            "transfer_s": t_sent - t_pause,
            "verify_s": t_verified - t_sent + self.sum_s,  # the sender's sums too, overlapped with the loads
            "verify_engine_s": t_verified - t_sent,
            "bytes": float(nbytes),
            "mb_per_s": nbytes / 1e6 / max(1e-9, t_sent - t_pause),
        } | self._delta_report()

    def _delta_report(self) -> dict[str, float]:
        if not self.cfg.delta:
            return {}
        d = self.delta_stats
        return {
            "delta": float(self.against is not None),  # 0: pushed in full (no base every engine holds)
            "changed_frac": d["changed"] / max(1, d["elements"]),
            "full_bytes": float(d["full_bytes"]),
        }

    def _reset_prefix_cache(self) -> None:
        """No KV computed with the old weights may be reused. Frozen requests (keep mode) hold their KV blocks, and
        a plain reset fails while any block is held (vLLM answers success=false) and leaves every cached prefix
        hittable, so the frozen requests are preempted too: they recompute their context with the new weights
        when they resume (their sampled tokens stay, tagged with the old version). The level-0 sleep that pauses
        clears nothing (vLLM 0.26 and 0.32 alike)."""
        answers = self._all("/reset_prefix_cache", params={"reset_running_requests": "true"})
        failed = [u for u, a in zip(self.urls, answers) if not (a or {}).get("success", False)]
        if failed:
            raise WeightPushError(
                f"prefix cache of {failed} not reset after the push: new requests could reuse KV of the old weights"
            )

    def verify(self, version: str, answers: list[Any] | None = None) -> None:
        """Every engine's parameters against what this push sent (`answers`: the sums the engines returned with
        the last bucket; asked again when absent); engines that disagree stay paused."""
        if answers is None:
            kwargs = {"names": list(self.sent), "dtypes": [d for _, _, d in self.sent.values()]}
            answers = self._all("/collective_rpc", {"method": "vime_weight_sums", "kwargs": kwargs})
        problems = [p for url, a in zip(self.urls, answers) for p in check(self.sent, a["results"], url)]
        self.float_names = None if problems else float_checked(a["results"] for a in answers)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise WeightPushError(f"weight push of version {version!r} not verified: " + "; ".join(problems[:5]) + more)

    def close(self) -> None:
        self.float_names = None
        self.pg = None
        self.staging = None
        self.connected = False
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()
