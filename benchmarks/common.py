"""Shared benchmark plumbing: machine description, JSON + PNG output under benchmarks/results/."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def exit_on_sigterm() -> None:
    """Turn SIGTERM (e.g. from `timeout`) into a normal exit, so `with server:` blocks stop the whole vLLM process
    tree; killed outright, the API server dies but its EngineCore child keeps the GPU memory."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return info


def card_slug() -> str:
    """The accelerator in a result's file name ("h100", "h200"; "cpu" without one), so results never mix cards."""
    gpu = machine().get("gpu")
    if not gpu:
        return "cpu"
    for word in str(gpu).lower().replace("-", " ").split():
        if word[:1] in "abhlv" and word[1:].isdigit():
            return word
    return "gpu"


def train_run(recipe: str, out: Path, sets: list[str], log: Path) -> dict[str, Any]:
    """`vime train -c recipe --set ...` in a subprocess (its own Ray, engines and trainer, all stopped with it):
    exit code, wall seconds, its start (epoch seconds), every logged row, and the eval reward by RL step."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "vime.cli", "train", "-c", recipe, "--set", f"run.out_dir={out}"]
    for s in sets:
        cmd += ["--set", s]
    t, started = time.perf_counter(), time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=root, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if rc == 0 else []
    evals = [(r["step"], r["eval/reward"]) for r in rows if "eval/reward" in r and r["step"] >= 0]
    return {"rc": rc, "seconds": time.perf_counter() - t, "started": started, "rows": rows, "eval": evals}


def scalar_walls(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, wall time) of each value a run logged under `tag`: tensorboard keeps when each scalar was written, which
    metrics.jsonl does not."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.wall_time) for e in acc.Scalars(tag)]


def write(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    out = out_dir or Path(os.environ.get("VIME_BENCH_OUT", RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=1) + "\n")
    return path


def bar_png(
    name: str, labels: list[str], values: list[float], ylabel: str, title: str, out_dir: Path | None = None
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = out_dir or Path(os.environ.get("VIME_BENCH_OUT", RESULTS))
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(labels)), 3.2))
    ax.bar(labels, values, color="#4c72b0")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lines_png(name: str, series: dict[str, list[tuple[float, float]]], ylabel: str, title: str, out_dir: Path) -> Path:
    """One line per label of (RL step, value) points, e.g. eval reward by step for each recipe or seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set(xlabel="RL step", ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
