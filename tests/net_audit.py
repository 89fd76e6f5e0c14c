"""Which sockets this test process and everything it started listen on (Ray, trainer ranks, vLLM servers)."""

from __future__ import annotations

import psutil

LOOPBACK = ("127.", "::1", "::ffff:127.")
RAY = ("ray::", "raylet", "gcs_server")


def listeners() -> dict[tuple[int, int], str]:
    """(pid, port) → 'name pid ip:port (parent; cmdline)' for every listening TCP socket in this process tree."""
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            conns, name = p.net_connections(kind="inet"), p.name()
            cmd = " ".join(p.cmdline())[:160]
            parent = p.ppid()
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                out[(p.pid, c.laddr.port)] = f"{name} {p.pid} {c.laddr.ip}:{c.laddr.port} (parent {parent}; {cmd})"
    return out


def beyond_loopback(found: dict[tuple[int, int], str]) -> list[str]:
    return [v for v in found.values() if not v.split()[2].startswith(LOOPBACK)]


def ray_beyond_loopback() -> list[str]:
    """Ray's own servers (GCS, raylet, workers, agents) that listen beyond loopback."""
    return [v for v in beyond_loopback(listeners()) if v.startswith(RAY) or "ray" in v.split("(")[1][:40]]
