"""Every number a user sees comes from here: JSONL + tensorboard while running, a PNG and a one-screen summary
at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# What the end-of-run figure shows: (title, metric keys).
PANELS = [
    ("reward", ["rollout/reward", "eval/reward"]),
    ("response length (tokens)", ["rollout/response_len"]),
    ("train/inference log-prob |Δ|", ["consistency/mean_abs_diff", "consistency/max_abs_diff"]),
    ("step time split (s)", ["time/rollout", "time/train", "time/weight_sync"]),
]


class MetricsLogger:
    def __init__(self, out_dir: str | Path, use_tensorboard: bool = True, wandb_project: str | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.out / "metrics.jsonl", "a")  # noqa: SIM115 - open for the run; close() closes it
        self.history: list[dict[str, Any]] = []
        self.tb = None
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        self.wandb = None
        if wandb_project:
            import wandb  # optional dependency

            self.wandb = wandb.init(project=wandb_project, dir=str(self.out))

    def restore(self, history: list[dict[str, Any]]) -> None:
        """On resume: the rows of the checkpoint, and metrics.jsonl rewritten to hold exactly them (a crashed run
        may have logged steps past its last checkpoint; the resumed run logs them again)."""
        self.history = list(history)
        self.jsonl.close()
        tmp = self.out / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        tmp.replace(self.out / "metrics.jsonl")
        self.jsonl = open(self.out / "metrics.jsonl", "a")  # noqa: SIM115 - open for the run; close() closes it

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def plot(self, path: str | Path | None = None, title: str = "vime run") -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path or self.out / "run.png")
        fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
        for ax, (name, keys) in zip(axes.flat, PANELS):
            for k in keys:
                pts = [(r["step"], r[k]) for r in self.history if k in r and not math.isnan(r[k])]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=k)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def summary(self) -> str:
        if not self.history:
            return "no steps logged"
        rewards = [r["rollout/reward"] for r in self.history if "rollout/reward" in r]
        evals = [(r["step"], r["eval/reward"]) for r in self.history if "eval/reward" in r]
        lines = [f"RL steps: {len(rewards)}"]
        if rewards:
            k = max(1, len(rewards) // 5)
            lines.append(
                f"rollout reward (mean of first/last {k} steps): {sum(rewards[:k]) / k:.3f} -> "
                f"{sum(rewards[-k:]) / k:.3f}"
            )
        if evals:
            lines.append(
                f"eval reward: {evals[0][1]:.3f} (step {evals[0][0]}) -> {evals[-1][1]:.3f} (step {evals[-1][0]})"
            )
        mism = [r["consistency/max_abs_diff"] for r in self.history if "consistency/max_abs_diff" in r]
        if mism:
            lines.append(f"train/inference log-prob max |Δ|: {max(mism):.2e} (worst step)")
        tps = [r["rollout/tokens_per_s"] for r in self.history if "rollout/tokens_per_s" in r]
        if tps:
            lines.append(f"rollout throughput: {sum(tps) / len(tps):.0f} response tokens/s (mean over steps)")
        for key in ("time/rollout", "time/train", "time/weight_sync"):
            vals = [r[key] for r in self.history if key in r]
            if vals:
                lines.append(f"{key}: {sum(vals) / len(vals):.2f} s/step")
        return "\n".join(lines)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
