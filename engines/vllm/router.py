"""vllm-router as a child process owned by the engine group: real P/D (`--vllm-pd-disaggregation`, KV moved by
the connector) or a plain pool with session-sticky routing (`--policy consistent_hash` on `x-session-id`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from engines.common.process import EngineStartError, kill_tree, log_tail, spawn
from vime.placement import free_port
from vime.secret import router_key, run_secret


def flags(args: dict[str, Any]) -> list[str]:
    """`{"retry_max_retries": 3, "disable_retries": True}` -> ["--retry-max-retries", "3", "--disable-retries"];
    a false switch is left out."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


def router_binary() -> str:
    exe = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    if not os.path.exists(exe):
        raise EngineStartError(
            "vllm-router is not installed (pip install vllm-router==0.1.17); engine.topology=pd "
            "and engine.router.enabled need it"
        )
    return exe


class VLLMRouter:
    def __init__(
        self,
        *,
        host: str,
        prefill: list[str],
        decode: list[str],
        workers: list[str],
        kv_connector: str,
        policy: str,
        log_path: Path,
        startup_timeout_s: float = 60.0,
        version: tuple[int, int, int],
        args: dict[str, Any] | None = None,
    ):
        self.host, self.port = host, free_port(host)
        self.prefill, self.decode, self.workers = prefill, decode, workers
        self.kv_connector, self.policy = kv_connector, policy
        self.log_path, self.startup_timeout_s, self.version = log_path, startup_timeout_s, version
        self.args = dict(args or {})
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        # its Prometheus exporter defaults to a fixed port (29000): give each router its own, or a second one dies
        cmd = [
            router_binary(),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--prometheus-host",
            self.host,
            "--prometheus-port",
            str(free_port(self.host)),
        ]
        if self.prefill:
            cmd += ["--vllm-pd-disaggregation", "--kv-connector", self.kv_connector, "--policy", self.policy]
            for u in self.prefill:
                cmd += ["--prefill", u]
            for u in self.decode:
                cmd += ["--decode", u]
        else:
            cmd += ["--worker-urls", *self.workers, "--policy", self.policy]
        return cmd + flags(self.args)

    def start(self) -> VLLMRouter:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = spawn(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                # in P/D mode the router sends `Bearer $OPENAI_API_KEY` to both servers for any path it is asked
                # (not the caller's header): a generation-only key, never the secret (engines/vllm/guard.py)
                env={**os.environ, "OPENAI_API_KEY": router_key(run_secret())},
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise EngineStartError(
                    f"vllm-router exited with code {code}; log {self.log_path} ends with:\n{log_tail(self.log_path)}"
                )
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise EngineStartError(
            f"vllm-router not healthy after {self.startup_timeout_s:.0f}s; log {self.log_path} "
            f"ends with:\n{log_tail(self.log_path)}"
        )

    def restart(self) -> None:
        """Same port, fresh worker table: the router can drop a live server from its table without a word in its
        log and then answer "No available workers" for the rest of the run (vllm-router 0.1.17, seen in CI)."""
        self.stop()
        self.start()

    def log_tail(self, n: int = 15) -> str:
        return f"router log {self.log_path} ends with:\n{log_tail(self.log_path, n)}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid)
            self.proc = None


def pd_args(role: str, on_cpu: bool, kv_connector: str) -> dict[str, Any]:
    """The server flags that make a server a P/D producer or consumer (NIXL; KV in host memory on CPU)."""
    connector = {"nixl": "NixlConnector", "mooncake": "MooncakeConnector"}.get(kv_connector, kv_connector)
    return {
        "kv_transfer_config": {
            "kv_connector": connector,
            "kv_role": "kv_producer" if role == "prefill" else "kv_consumer",
            "kv_buffer_device": "cpu" if on_cpu else "cuda",
        }
    }
