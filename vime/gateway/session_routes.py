"""`GET /sessions` and `GET /sessions/{id}`: what the gateway recorded, for agent developers to inspect while
`vime serve` runs (behind the API key like every route but /health)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from vime.gateway.schema import APIError
from vime.gateway.sessions import SessionStore


def install_session_routes(app: FastAPI, store: SessionStore) -> None:
    @app.get("/sessions")
    async def list_sessions() -> dict[str, Any]:
        with store.lock:
            rows = [
                {"id": s.id, "branches": len(s.branches), "turns": sum(len(b.turns) for b in s.branches)}
                for s in store.sessions.values()
            ]
        return {"object": "list", "data": rows}

    @app.get("/sessions/{sid}")
    async def get_session(sid: str) -> dict[str, Any]:
        """Every branch of the session as a sample: token ids, loss mask, log-probs, and whether it is exact."""
        if sid not in store.sessions or not any(b.turns for b in store.sessions[sid].branches):
            raise APIError(404, f"no recorded session {sid!r}", param="sid", code="session_not_found")
        return {"id": sid, "object": "session", "branches": [x.to_dict() for x in store.to_samples(sid)]}
