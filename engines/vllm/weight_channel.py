"""The sender side of the weight-transfer channel, driving vLLM servers over HTTP.

One control flow for every backend: per staging round (per bucket; one per push when the model fits the buffer)
one `POST /vime/push` to every engine (`push_route.py`, in the engine's API server): pause on the first round,
then vLLM's own worker start/update/finish of the weight-transfer session (`vime_update`) with the backend's data
plane — a gloo or NCCL broadcast, a CUDA-IPC staging buffer, a safetensors file; on the last round also the
version (vLLM >= 0.27), the prefix-cache reset, the check of the engine's weight sums against the sums sent after
the call, and the resume. A push is latency-bound, so control round trips are what it costs: a one-bucket push is one
round trip, where vLLM's routes one by one made seven and `/pause` alone costs 20 ms. It runs in the process
that holds the tensors (trainer rank 0, or a test's transformers model). Any failure raises `WeightPushError`
and leaves the engines paused: they may hold half-updated weights and must be restarted and re-synced, never
resumed.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import torch

from engines.vllm import delta
from engines.vllm.delta import Base
from engines.vllm.fingerprint import dtype_name
from engines.vllm.in_place import Mapped, encoded, in_place
from engines.vllm.push_route import EXPECT_PATH, NEEDS, WORKERS_PATH
from engines.vllm.push_route import PATH as PUSH_PATH
from engines.vllm.sent_sums import Bucket, SentSums
from engines.vllm.server import vllm_version
from engines.vllm.staging import Staging
from engines.vllm.worker_ranks import rank_offsets
from vime.placement import free_port, listening_socket
from vime.secret import auth_headers
from vime.weights import WeightPushError, WeightsConfig

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
        new_finish_api: bool | None = None,
    ):
        self.cfg = cfg if isinstance(cfg, WeightsConfig) else WeightsConfig(**cfg)
        self.urls = list(urls)
        self.master_address = master_address
        # vLLM >= 0.27 takes weight_version in /finish_weight_update and reports it in /weight_info
        self.new_finish_api = vllm_version() >= (0, 27, 0) if new_finish_api is None else new_finish_api
        self.http = httpx.Client(timeout=self.cfg.timeout_s, headers=auth_headers())
        self.pool = ThreadPoolExecutor(max(4, len(self.urls) * 2))
        self.pg: Any = None  # gloo process group / NCCL communicator
        self.staging: Staging | None = None  # ipc: the buffer engines map once
        self.mapped = Mapped()  # ipc: the trainer memory the engines read resident weights from (`in_place.py`)
        self.connected = False
        self.sums = SentSums()  # what each push sent, for its check (`weights.verify`)
        self.version = ""  # the version being pushed
        self.calls = 0  # control calls (HTTP round trips to every engine) this push made
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
        self.calls += 1
        futs = [self.pool.submit(self._post, u, path, json, params) for u in self.urls]
        out = [f.result(timeout=self.cfg.timeout_s) for f in futs]
        self._took(label or path.strip("/"), t0)
        return out

    def _took(self, phase: str, t0: float) -> None:
        self._took_s(phase, time.perf_counter() - t0)

    def _took_s(self, phase: str, seconds: float) -> None:
        self.timeline[phase] = self.timeline.get(phase, 0.0) + seconds

    def _round(
        self, meta: dict[str, Any], tensors: Bucket, first: bool, last: bool, send: Any = None, staged: int = 0
    ) -> None:
        """One round on every engine: its `/vime/push` call, the backend's data plane (`send`) and the sender's sums
        for `verify`, summed while the engines pause and load; the last round's call waits for all of them, which
        follow it in a second request (`push_route.EXPECT_PATH`)."""
        t0 = time.perf_counter()
        futs = self._step(meta, first, last)
        if send is not None:
            send()
        self._record(tensors, staged)
        if last and self.cfg.verify:
            self._send_expected(futs, t0)
        self._landed(futs, last, t0)

    @property
    def sent(self) -> dict[str, tuple[list[Any], int, str]]:
        """The last push's tensors: sums, numel, dtype."""
        return self.sums.sent

    def _send_expected(self, futs: list[Future[Any]], t0: float) -> None:
        """The sums the engines' last round waits for. If they cannot be sent, the rounds end when their wait runs
        out (paused, never resumed), and the error says both."""
        body = self.sums.expect_body()
        errors = []
        for f in [self.pool.submit(self._post, u, EXPECT_PATH, body) for u in self.urls]:
            try:
                f.result(timeout=self.cfg.timeout_s)
            except WeightPushError as e:
                errors.append(str(e))
        if errors:
            try:
                self._landed(futs, True, t0)
            except WeightPushError as e:
                errors.append(str(e))
            raise WeightPushError("the sums of the push could not be sent: " + "; ".join(errors))

    def _step(self, meta: dict[str, Any], first: bool, last: bool) -> list[Future[Any]]:
        self.calls += 1
        self.sums.announce(meta)
        update: dict[str, Any] = {"update_info": meta, "start": first, "finish": last}
        step: dict[str, Any] = {"update": update, "pause": self.cfg.pause_mode if first else None, "last": last}
        if last:
            if self.cfg.verify:
                to_update, to_step = self.sums.ask(self.cfg.verify_read_back, self.cfg.timeout_s)
                update |= to_update
                step |= to_step
            if self.new_finish_api:
                step["version"] = self.version
            if self.cfg.delta:  # once verified, what both sides kept is this version's base
                step["commit"] = self.version
        return [self.pool.submit(self._post, u, PUSH_PATH, {**step, "label": u}) for u in self.urls]

    def _landed(self, futs: list[Future[Any]], last: bool, t0: float) -> None:
        try:
            answers = [f.result(timeout=self.cfg.timeout_s) for f in futs]
        except WeightPushError as e:
            if "vime_update" in str(e) or " 404" in str(e):  # a server started without vime's extension or route
                raise WeightPushError(f"{e} — {NEEDS}") from e
            raise
        self._took("round", t0)
        for k in {k for a in answers for k in a["phases"]}:  # the engines work side by side: the slowest counts
            self._took_s(f"engine_{k}", max(a["phases"].get(k, 0.0) for a in answers))
        for k in ("load", "sum"):  # inside engine_update: the workers' load and sums, less the RPC around them
            self._took_s(f"worker_{k}", max((w.get(f"{k}_s", 0.0) for a in answers for w in a["results"]), default=0))
        if last:
            self._finished(answers)

    def _finished(self, answers: list[dict[str, Any]]) -> None:
        problems = [p for a in answers for p in a["problems"]]
        if self.cfg.verify:
            self.sums.answered(answers, problems)
        self._fail_if(problems)
        if self.new_finish_api and any(a.get("weight_version") != self.version for a in answers):
            got = [a.get("weight_version") for a in answers]
            raise WeightPushError(f"engines report weight versions {got} after pushing {self.version!r}")

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
        self.connected, self.sums.float_names = True, None

    def _workers_call(self, method: str, kwargs: dict[str, Any]) -> list[Any]:
        """`method` on every worker of every engine (`push_route.WORKERS_PATH`): one answer per server."""
        try:
            return self._all(WORKERS_PATH, {"method": method, "kwargs": kwargs}, label=method)
        except WeightPushError as e:
            if " 404" in str(e):
                raise WeightPushError(f"{e} — {NEEDS}") from e
            raise

    def _connect_broadcast(self, backend: str) -> None:
        """One group: the sender is rank 0, every engine worker joins at its rank offset."""
        world, offsets = rank_offsets(self.urls, self._workers_call("vime_workers", {}), backend)
        sock = listening_socket(self.master_address) if backend == "gloo" else None  # the store binds no more
        port = sock.getsockname()[1] if sock is not None else free_port(self.master_address)
        extra = {"timeout_s": self.cfg.timeout_s} if backend == "gloo" else {}
        group = {"master_address": self.master_address, "master_port": port, "world_size": world, **extra}
        path = "/init_weight_transfer_engine"
        futs = [
            self.pool.submit(self._post, u, path, {"init_info": group | {"rank_offset": offset}})
            for u, offset in zip(self.urls, offsets)
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
        self.staging = Staging(self.cfg.bucket_mb << 20, "cuda")
        self.mapped = Mapped()
        init = {"mode": "staging", "handle": encoded(self.staging.handle())}
        self._all("/init_weight_transfer_engine", {"init_info": init})

    # ---- data plane ------------------------------------------------------------------------------------
    def _record(self, bucket: Bucket, staged: int = 0) -> None:
        """The bucket's fingerprints for `verify` (`SentSums.record`; the first `staged` are in the staging buffer)."""
        if self.cfg.verify:
            self.sums.record(bucket, staged, self.staging, fixed=self.cfg.backend == "ipc")

    def _delta_base(self) -> str | None:
        """The version a delta can be against: the one this side last pushed, if every engine worker holds it."""
        if self.base.version is None:
            return None
        answers = self._workers_call("vime_delta_version", {})
        held = {v for a in answers for v in a["results"]}
        return self.base.version if held == {self.base.version} else None

    def _send_bucket(self, bucket: Bucket, first: bool, last: bool) -> int:
        if self.cfg.backend == "ipc":  # describes each round itself (a bucket may not fit the buffer at once)
            return self._send_ipc(bucket, first, last)
        meta = bucket_meta(bucket)
        wire = bucket
        if self.cfg.delta:
            extra, wire = delta.encode_bucket(self.base, bucket, self.against, self.delta_stats)
            meta |= extra
        if self.cfg.backend == "gloo":  # engines block in the update until the broadcast lands
            from engines.vllm.worker_ext import GlooWeightTransferEngine

            send = {"group": self.pg}
            self._round(
                meta, bucket, first, last, send=lambda: GlooWeightTransferEngine.trainer_send_weights(iter(wire), send)
            )
            return sum(t.numel() * t.element_size() for _, t in wire)
        if self.cfg.backend == "nccl":
            self._round({**meta, "packed": True}, bucket, first, last, send=lambda: self._send_nccl(bucket))
            return sum(t.numel() * t.element_size() for _, t in bucket)
        from engines.vllm.worker_ext import DiskWeightTransferEngine

        path = os.path.join(self.cfg.disk_dir, f"vime-{uuid.uuid4().hex}.safetensors")
        DiskWeightTransferEngine.trainer_send_weights(iter(bucket), {"path": path})
        try:
            self._round({**meta, "path": path}, bucket, first, last)
            return os.path.getsize(path)
        finally:
            os.unlink(path)

    def _send_nccl(self, bucket: Bucket) -> None:
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerSendWeightsArgs, NCCLWeightTransferEngine

        NCCLWeightTransferEngine.trainer_send_weights(
            iter([(n, t.detach().contiguous()) for n, t in bucket]),
            NCCLTrainerSendWeightsArgs(group=self.pg, packed=True),
        )
        torch.cuda.synchronize()

    def _send_ipc(self, bucket: Bucket, first: bool, last: bool) -> int:
        """The trainer's resident weights are read by the engines where they are; the rest is copied into the
        staging buffer (device to device, one multi-tensor copy) and loaded from views of it. A bucket larger
        than the buffer goes in several rounds (`staging.py`); the resident tensors go with the first."""
        assert self.staging is not None
        read_in_place = [self.cfg.in_place and in_place(t) for _, t in bucket]
        direct = [nt for nt, d in zip(bucket, read_in_place) if d]
        staged = [nt for nt, d in zip(bucket, read_in_place) if not d]
        try:
            rounds = self.staging.rounds(staged) if staged else [[]]
        except ValueError as e:
            raise WeightPushError(str(e)) from e
        for i, part in enumerate(rounds):
            t0 = time.perf_counter()
            views = self.staging.fill(part) if part else []
            here = direct if i == 0 else []
            torch.cuda.synchronize()  # the copy, and the trainer's last writes to what the engines read in place
            self._took("copy", t0)
            meta = bucket_meta(views + here) | self.mapped.placement(self.staging.offsets[: len(views)], here)
            self._round(meta, views + here, first and i == 0, last and i == len(rounds) - 1, staged=len(views))
        return sum(t.numel() * t.element_size() for _, t in bucket)

    def push(self, buckets: Iterable[Bucket], version: str) -> dict[str, float]:
        if not self.connected:
            self.connect()
        t0 = time.perf_counter()
        nbytes, self.timeline, self.version, self.calls = 0, {}, version, 0
        self.sums.reset()
        self.delta_stats = dict.fromkeys(self.delta_stats, 0)
        try:
            if self.cfg.delta:
                self.against, self.base.version = self._delta_base(), None  # the base changes as buckets go
            for bucket, first, last in marked(b for b in buckets if b):  # the last round must carry the finish
                nbytes += self._send_bucket(bucket, first, last)
            if not self.sums.names:
                raise WeightPushError(f"weight push of version {version!r} has no tensors")
            self.mapped.unread()
            if self.cfg.delta:
                self.base.version = version
        except WeightPushError:
            raise
        except Exception as e:  # a broken broadcast, a timeout, a dead engine
            raise WeightPushError(f"weight push of version {version!r} failed: {type(e).__name__}: {e}") from e
        push_s = time.perf_counter() - t0
        tl = self.timeline
        control = sum(tl.get(f"engine_{k}", 0.0) for k in ("pause", "check", "commit", "resume"))
        verify_engine = self.sums.engine_sum_s + tl.get("engine_check", 0.0)
        return {
            **{f"phase/{k}_s": v for k, v in tl.items()},
            "push_s": push_s,
            "pause_s": tl.get("engine_pause", 0.0),
            "transfer_s": push_s - control,  # the rounds, less what the engines spent pausing, checking, resuming
            "verify_s": verify_engine
            + self.sums.sum_s,  # the sender's sums too (overlapped with the loads but the last)
            "verify_engine_s": verify_engine,
            "summed_in_copy": float(self.sums.summed_in_copy),  # parameters an engine's copy summed as it wrote them
            "verified_workers": float(self.sums.workers),
            "bytes": float(nbytes),
            "control_calls": float(self.calls),
            "mb_per_s": nbytes / 1e6 / max(1e-9, push_s - control),
        } | (delta.report(self.delta_stats, self.against) if self.cfg.delta else {})

    def verify(self, version: str) -> None:
        """Every engine's parameters against what the last push sent, asked again (a push checks itself; this
        checks later that nothing changed an engine since); engines that disagree stay as they are."""
        answers = self._workers_call("vime_weight_sums", self.sums.asked_again())
        problems = self.sums.judged(self.urls, answers)
        self.version = version
        self._fail_if(problems)

    def _fail_if(self, problems: list[str]) -> None:
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise WeightPushError(
                f"weight push of version {self.version!r} not verified: " + "; ".join(problems[:5]) + more
            )

    def close(self) -> None:
        self.sums.float_names = None
        self.pg = None
        self.staging = None
        self.connected = False
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()
