"""Ray placement: a local cluster when none is given, and placement groups of CPU or GPU bundles.

The same code places ranks on CPU bundles here and GPU bundles on GPU hosts; only the bundle shape differs.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vime.secret import ENV as SECRET_ENV
from vime.secret import run_secret


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(default=None, description="existing cluster ('auto' or host:port); None starts one")
    num_cpus: int | None = Field(default=None, description="CPUs of the local cluster (default: all)")


class PlacementConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    colocate: bool = Field(
        default=False,
        description="trainer ranks and engines share bundles (on GPU: the same "
        "GPU, engines sleep while training); false: separate ones",
    )


def plan(
    colocate: bool, trainer_ranks: int, trainer_bundle: dict[str, float], engines: int, engine_bundle: dict[str, float]
) -> tuple[list[dict[str, float]], list[int], list[int]]:
    """Bundles of one placement group, and which bundle each trainer rank and each engine uses."""
    if not colocate:
        bundles = [trainer_bundle] * trainer_ranks + [engine_bundle] * engines
        return bundles, list(range(trainer_ranks)), [trainer_ranks + i for i in range(engines)]
    n = max(trainer_ranks, engines)
    both = {k: trainer_bundle.get(k, 0) + engine_bundle.get(k, 0) for k in set(trainer_bundle) | set(engine_bundle)}
    if both.get("GPU"):
        both["GPU"] = max(trainer_bundle.get("GPU", 0), engine_bundle.get("GPU", 0))  # one GPU, shared
    return [both] * n, list(range(trainer_ranks)), [i % n for i in range(engines)]


def ensure_ray(cfg: RayConfig | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    env = {
        "env_vars": {
            "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
            "TOKENIZERS_PARALLELISM": "false",
            SECRET_ENV: run_secret(),  # a trainer rank's weight channel talks to the engines with it
        }
    }
    if cfg.address:
        ray.init(address=cfg.address, runtime_env=env, log_to_driver=True)
        return
    loopback_only(ray, env["env_vars"])
    on_term = signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False, runtime_env=env, log_to_driver=True)
    if callable(on_term) and threading.current_thread() is threading.main_thread():
        # Ray's C++ failure handler takes SIGTERM over (it dumps a stack and aborts, leaving its agents behind);
        # the caller's handler unwinds through the context managers that stop engines and trainer
        signal.signal(signal.SIGTERM, on_term)


def loopback_only(ray: Any, env_vars: dict[str, str]) -> None:
    """A cluster started here serves this host only, so nothing of it listens beyond loopback: Ray's node address
    becomes 127.0.0.1 (its switch for single-host clusters, read at import, hence also set on the loaded module;
    GCS, raylet and worker servers bind the node address) and gloo picks the loopback device."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = env_vars["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env_vars.setdefault("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
        constants.ENABLE_RAY_CLUSTER = False


def placement_group(bundles: list[dict[str, float]], name: str | None = None, timeout_s: float = 120.0) -> Any:
    """A PACK placement group; fails with the resources asked vs available instead of waiting forever."""
    import ray
    from ray.util.placement_group import placement_group as make_pg

    bundles = [{k: v for k, v in b.items() if v} for b in bundles]
    pg = make_pg(bundles, strategy="PACK", name=name or "")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(
            f"Ray could not place bundles {bundles} within {timeout_s:.0f}s; cluster has "
            f"{ray.available_resources()} available"
        ) from None
    return pg


def bundle_strategy(pg: Any, index: int) -> Any:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def remove_placement_group(pg: Any) -> None:
    import ray

    if ray.is_initialized():
        ray.util.remove_placement_group(pg)


def listening_socket(host: str) -> socket.socket:
    """A socket already listening on `host` (not on every interface) at a port the kernel picked, for a
    rendezvous store to take over: torch's TCPStore binds every interface unless handed one, and a port that
    stays bound cannot be taken by anyone in between."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


_PORTS = random.SystemRandom()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, drawn below the kernel's ephemeral range: a port the OS handed out (bind to 0)
    can be given to an outgoing connection before its new owner listens on it (seen as EADDRINUSE in a weight
    channel's rendezvous); ports outside the range are only ever taken by explicit binds. Ray's worker ports
    (10002-19999 by default) are avoided too, and the draw never touches the `random` state runs seed."""
    low = 32768
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    for _ in range(200):
        port = _PORTS.randint(20000 if low > 21000 else 1024, low - 1)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded range: fall back to the kernel's choice
        s.bind((host, 0))
        return int(s.getsockname()[1])
