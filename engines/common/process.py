"""Child processes of an engine (a server, a router): spawned in their own session so the whole tree can be
signalled, dying with vime even when it is SIGKILLed, stopped with nothing left behind; and server flags written
verbatim from a recipe's `engine.args`. Shared by every engine in `engines/`; nothing here knows one."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import psutil


class EngineStartError(RuntimeError):
    pass


def to_cli_flags(args: dict[str, Any]) -> list[str]:
    """`{max_num_seqs: 64, enforce_eager: true, weight_transfer_config: {...}}` → vLLM flags, verbatim."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        if value is None:
            continue
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process: a server started from
# a short-lived thread (a restart in asyncio.to_thread, whose pool ends with its event loop) would be killed with
# it, its EngineCore orphaned. Every child is forked from this one thread, which lives as long as the process.
_SPAWNER = ThreadPoolExecutor(1, thread_name_prefix="vime-spawn")


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """Popen in its own session (the whole tree can be signalled), dying with this process."""

    def popen() -> subprocess.Popen:
        return subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)  # noqa: PLW1509 - prctl only, async-signal-safe

    return _SPAWNER.submit(popen).result()


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


def kill_tree(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process and all its descendants, SIGKILL whatever is left after `timeout`."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def kill_group(pgid: int, timeout: float = 10.0) -> None:
    """SIGTERM every process still in the group, SIGKILL what is left. A server started in its own session leads
    its group; once its root is gone its workers are re-parented and a tree walk no longer finds them, but they
    stay in the group (the orphaned `VLLM::EngineCore` / `VLLM::Worker` after a SIGKILL of the server)."""

    def members() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except (OSError, psutil.Error):
                continue
        return out

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        procs = members()
        if not procs:
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        psutil.wait_procs(procs, timeout=wait)


class ServerProcess:
    """One engine server as a child process: start, wait for health (with a timeout and the log's tail on
    failure), stop with nothing left behind. An engine's server class says only how it is launched (`command`,
    `launch_env`); the loopback default and the run's secret in the environment come with it."""

    label = "engine"  # names the server in errors

    def __init__(
        self,
        model_path: str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        args: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path = "engine.log",
        startup_timeout_s: float = 300.0,
        guard: bool = True,
    ):
        from vime.placement import free_port

        self.model_path = model_path
        self.host = host
        self.port = port or free_port(host)
        self.args = dict(args or {})
        self.env = dict(env or {})
        self.log_path = Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.guard = guard  # False only for a benchmark's bare-engine baseline
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        raise TypeError(f"{type(self).__name__} must say how its server is launched (command)")

    def launch_env(self) -> dict[str, str]:
        """Extra environment the engine's server needs (under the recipe's `engine.env`, which wins)."""
        return {}

    def start(self) -> Self:
        from vime.secret import ENV as SECRET_ENV
        from vime.secret import run_secret

        if not Path(self.model_path).exists():
            raise EngineStartError(f"model directory {self.model_path!r} does not exist (model.path)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.launch_env(), SECRET_ENV: run_secret(), **self.env}
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps it; closed right after Popen
        try:
            self.proc = spawn(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        finally:
            log.close()
        return self

    def wait_healthy(self, path: str = "/health") -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                self.stop()
                raise EngineStartError(
                    f"{self.label} server on port {self.port} exited with code {code} during startup; "
                    f"log {self.log_path} ends with:\n{log_tail(self.log_path)}"
                )
            try:
                if httpx.get(self.base_url + path, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise EngineStartError(
            f"{self.label} server on port {self.port} not healthy after {self.startup_timeout_s:.0f}s "
            f"(engine.startup_timeout_s); log {self.log_path} ends with:\n{log_tail(self.log_path)}"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        # taken first: a stop may race another (an actor's stop while its start fails and stops the server)
        proc, self.proc = self.proc, None
        if proc is None:
            return
        kill_tree(proc.pid)
        kill_group(proc.pid)  # start_new_session: the server's pid is its group id
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> Self:
        self.start()
        self.wait_healthy()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
