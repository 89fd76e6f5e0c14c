"""Worker side of rollout routing replay (R3) on vLLM builds without `enable_return_routed_experts` (the CPU line: 0.32
serves it only through Model Runner V2, which needs Triton).

vLLM's own `RoutedExpertsCapturer` is bound to every MoE router (the hook its GPU path uses), so each forward step
leaves the experts of each of its tokens in one buffer; a forward hook on the model then files those rows under
their request and position, using the runner's batch layout of that step. Only requests the client tagged
(ROUTES_TAG in their sampling params' extra_args) are kept: the tag, unlike the request id, survives a P/D router.
The client takes a finished request's routes through `/vime/workers` (every worker of every data-parallel engine
answers). Only positions this server computed are known: a prefix-cache hit leaves cached prompt positions without
routes, and under P/D the prompt's are on the prefill server; the client (`routes.py`) merges what every server has
and refuses a gap.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from engines.vllm.routes import ROUTES_TAG

MAX_REQUESTS = 4096  # routes of requests nobody takes (aborted, or a client that died) are dropped oldest first


class RouteRecorder:
    def __init__(self, runner: Any, vllm_config: Any) -> None:
        from vllm.model_executor.layers.fused_moe.routed_experts_capturer import (
            RoutedExpertsCapturer,
            bind_routed_experts_capturer,
        )

        self.runner = runner
        self.capturer = RoutedExpertsCapturer(vllm_config.scheduler_config.max_num_batched_tokens, vllm_config)
        bind_routed_experts_capturer(runner.model, self.capturer)
        self.routes: OrderedDict[str, dict[int, np.ndarray]] = OrderedDict()  # vLLM's request id -> rows
        self.tags: dict[str, str] = {}  # vLLM's request id -> the client's tag
        runner.model.register_forward_hook(self._file_step, with_kwargs=True)

    def _file_step(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
        batch = self.runner.input_batch
        n_reqs = batch.num_reqs
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if not n_reqs or positions is None:  # profiling and warm-up runs
            return
        starts = self.runner.query_start_loc.np[: n_reqs + 1]
        n = int(starts[-1])
        rows = self.capturer.device_buffer[:n].to("cpu", torch.int16).numpy()
        pos = positions[:n].to("cpu").numpy()
        for i, req in enumerate(batch.req_ids[:n_reqs]):
            tag = self._tag(req)
            if tag is None:
                continue
            self.tags[req] = tag
            mine = self.routes.setdefault(req, {})
            for t in range(int(starts[i]), int(starts[i + 1])):
                mine[int(pos[t])] = rows[t].copy()
        while len(self.routes) > MAX_REQUESTS:
            self.tags.pop(self.routes.popitem(last=False)[0], None)

    def _tag(self, req: str) -> str | None:
        state = self.runner.requests.get(req)
        extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
        return extra.get(ROUTES_TAG)

    def take(self, tag: str) -> dict[str, dict[str, list[Any]]]:
        """{vLLM's request id: {"positions": [...], "experts": [[layer][k], ...]}} for every request (each sampled
        child is one) the client tagged `tag`, removed here. Only the positions this server computed: the client
        merges servers (P/D)."""
        out: dict[str, dict[str, list[Any]]] = {}
        for req in [r for r, t in self.tags.items() if t == tag]:
            del self.tags[req]
            by_pos = self.routes.pop(req)
            order = sorted(by_pos)
            out[req] = {"positions": order, "experts": np.stack([by_pos[p] for p in order]).tolist()}
        return out
