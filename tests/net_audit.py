"""Which sockets this test process and everything it started listen on (Ray, trainer ranks, vLLM servers)."""

from __future__ import annotations

import psutil

LOOPBACK = ("127.", "::1", "::ffff:127.")


def listening_beyond_loopback() -> list[str]:
    """`name pid addr:port` of each listening TCP socket in this process tree not bound to a loopback address."""
    me = psutil.Process()
    out = []
    for p in [me, *me.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and not c.laddr.ip.startswith(LOOPBACK):
                out.append(f"{name} {p.pid} {c.laddr.ip}:{c.laddr.port}")
    return out
