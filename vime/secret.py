"""The run's secret: engines vime starts accept admin and generation requests only with it.

Engines listen on loopback, but any local process can reach loopback: without a secret it could pause serving,
push weights or sleep an engine. One secret per run is drawn in the driver and travels by environment only
(never on a command line, where `ps` shows it to every user): servers started by the driver inherit it and the
local Ray cluster hands it to every worker, so a trainer rank's weight channel holds the same one.
"""

from __future__ import annotations

import hashlib
import os
import secrets

ENV = "VIME_ENGINE_SECRET"


def run_secret() -> str:
    """This process tree's secret, drawn on first use (a user may set it, e.g. to attach engines started with
    the same value)."""
    value = os.environ.get(ENV)
    if not value:
        value = os.environ[ENV] = secrets.token_urlsafe(32)
    return value


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {run_secret()}"}


def router_key(secret: str) -> str:
    """A key derived from the secret for a proxy in front of the engines, which the engines accept on their
    generation routes only (a proxy that forwards every path must not carry the admin secret)."""
    return hashlib.sha256(f"vime-router:{secret}".encode()).hexdigest()
