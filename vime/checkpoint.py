"""Checkpoints for exact resume, written atomically: everything goes to a temp directory that is renamed into
place only when complete, so a crash mid-save never leaves a checkpoint that looks whole."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from vime.protocols import Critic, Trainer

# Keys a resumed run may change; any other difference would make the resumed run diverge from the original.
RESUMABLE_CHANGES = (
    "loop.num_steps",
    "loop.eval_every",
    "loop.save_every",
    "loop.keep",
    "run.out_dir",
    "engine.startup_timeout_s",
    "engine.request_timeout_s",
    "engine.env",
    "ray.",
)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def incompatible_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    a, b = flatten(saved), flatten(current)
    changed = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k) and not any(k == p or k.startswith(p) for p in RESUMABLE_CHANGES):
            changed.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return changed


def save(
    root: str | Path,
    step: int,
    trainer: Trainer,
    state: dict[str, Any],
    config: dict[str, Any],
    export_hf: bool = True,
    keep: int | None = None,
    critic: Critic | None = None,
) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        trainer.save(str(tmp / "trainer"))
        if critic is not None:
            critic.save(str(tmp / "critic"))
        if export_hf:
            trainer.save_hf(str(tmp / "hf"))
        (tmp / "state.json").write_text(json.dumps(state))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest = root / ".latest.tmp"
    latest.write_text(final.name)
    os.replace(latest, root / "latest")
    if keep:
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a checkpoints root (its `latest`)."""
    p = Path(path)
    if (p / "latest").exists():
        p = p / (p / "latest").read_text().strip()
    if not (p / "state.json").exists():
        raise FileNotFoundError(
            f"{str(p)!r} is not a vime checkpoint (no state.json); pass a step_* directory or the checkpoints root"
        )
    return p


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"checkpoint file {path} cannot be read ({type(e).__name__}: {e}); the checkpoint is "
            "damaged: resume from another step_* directory"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"checkpoint file {path} holds {type(data).__name__}, not a mapping; the checkpoint is damaged"
        )
    return data


def load(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    p = resolve(path)
    return p, read_json(p / "state.json"), read_json(p / "config.json")
