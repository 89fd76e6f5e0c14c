"""Fault injection over a real run: `python benchmarks/chaos.py -c configs/grpo_tiny_cpu.yaml --faults 20`.

Runs `vime train` on the recipe (checkpoints every step, samples saved) while, at seeded random moments, it SIGKILLs a
vLLM server (the run must restart it and carry on), SIGSTOPs a server's whole process group (a hung engine: alive,
answering nothing; the run's health probes must find it and restart it) or SIGKILLs a Megatron trainer rank (the run
dies; the tool resumes it from the last checkpoint, as a user would). At the end it reads what the run trained on and
prints faults injected / survived, runs resumed, samples expected / lost / duplicated, and processes left behind; the
report goes to benchmarks/results/chaos_cpu.json. The baseline in the same run is the fault-free count of samples the
recipe must train on (steps x prompts x samples per prompt)."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engines.vllm.server import SERVER_MODULE as SERVER  # noqa: E402


def processes(tag: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            cmd = " ".join(p.info["cmdline"] or []) or (p.info["name"] or "")
        except psutil.Error:
            continue
        if tag in cmd and p.status() != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


def engine_family() -> set[int]:
    """Every vLLM server and its workers (EngineCore, Worker): what must not outlive a run."""
    pids = set()
    for p in processes(SERVER):
        pids.add(p.pid)
        pids |= {c.pid for c in p.children(recursive=True)}
    return pids | {p.pid for p in processes("VLLM::")}


class Injector(threading.Thread):
    """Kills one victim every `gap` seconds (jittered) until `faults` kills are done or `stop` is set."""

    def __init__(self, faults: int, seed: int, gap: float, trainer_share: float, hang_share: float):
        super().__init__(daemon=True)
        self.rng = random.Random(seed)
        self.faults, self.gap, self.trainer_share, self.hang_share = faults, gap, trainer_share, hang_share
        self.injected: list[dict[str, object]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while len(self.injected) < self.faults and not self.stop.wait(self.gap * self.rng.uniform(0.5, 1.5)):
            draw = self.rng.random()
            kind = (
                "trainer"
                if draw < self.trainer_share
                else "hang"
                if draw < self.trainer_share + self.hang_share
                else "engine"
            )
            victims = processes("ray::MegatronWorker" if kind == "trainer" else SERVER)
            if not victims:  # the run is (re)starting: try again at the next tick
                continue
            victim = self.rng.choice(victims)
            try:
                if kind == "hang":
                    os.killpg(os.getpgid(victim.pid), signal.SIGSTOP)
                else:
                    os.kill(victim.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.injected.append({"kind": kind, "pid": victim.pid, "t": time.time()})
            what = "SIGSTOP (hang)" if kind == "hang" else "SIGKILL"
            print(f"chaos: {what} {kind} pid {victim.pid} ({len(self.injected)}/{self.faults})", flush=True)


def train_once(recipe: str, out: Path, sets: list[str], resume: bool, log: Path) -> int:
    cmd = [sys.executable, "-m", "vime.cli", "train", "-c", recipe]
    for s in [f"run.out_dir={out}", *sets]:
        cmd += ["--set", s]
    if resume and (out / "checkpoints" / "latest").exists():
        cmd += ["--resume", str(out / "checkpoints")]
    with open(log, "a") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=False).returncode


def audit(out: Path, steps: int, prompts: int, n: int) -> dict[str, int]:
    """What the finished run trained on, step by step, from its samples files and metrics."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl_steps = [r["step"] for r in rows if "rollout/reward" in r]
    lost = duplicated = 0
    for step in range(1, steps + 1):
        path = out / "samples" / f"step_{step:06d}.jsonl"
        samples = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        keys = [(s["group_id"], s["index"]) for s in samples]
        duplicated += len(keys) - len(set(keys))
        lost += prompts * n - len(set(keys))
    return {
        "expected": steps * prompts * n,
        "lost": lost,
        "duplicated": duplicated,
        "metric_rows_repeated": len(rl_steps) - len(set(rl_steps)),
        "steps_logged": len(set(rl_steps)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/grpo_tiny_cpu.yaml")
    ap.add_argument("--faults", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gap", type=float, default=25.0, help="mean seconds between faults")
    ap.add_argument("--trainer-share", type=float, default=0.25, help="fraction of faults that kill a trainer rank")
    ap.add_argument("--hang-share", type=float, default=0.25, help="fraction of faults that hang an engine")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="runs/chaos")
    ap.add_argument("--max-resumes", type=int, default=30)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import bar_png, write
    from vime.config import load_config

    out = (ROOT / a.out).resolve()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    sets = [
        f"loop.num_steps={a.steps}",
        "loop.save_every=1",
        "loop.keep=2",
        "run.save_samples=true",
        "loop.eval_every=0",
        "loop.sft_steps=20",
        f"loop.max_engine_restarts={a.faults + 1}",
        # a hung server is found by 2 missed probes 2 s apart (5 s each) instead of the default 3 x 10 s
        "loop.engine_probe.interval_s=2",
        "loop.engine_probe.timeout_s=5",
        "loop.engine_probe.failures=2",
        "weights.timeout_s=30",  # a push to a hung server fails after 30 s (default 300) and restarts the servers
    ]
    cfg = load_config(ROOT / a.config, sets)
    before = engine_family()
    injector = Injector(a.faults, a.seed, a.gap, a.trainer_share, a.hang_share)
    t0 = time.time()
    injector.start()
    resumes, rc = -1, 1
    while rc != 0 and resumes < a.max_resumes:
        resumes += 1
        rc = train_once(a.config, out, sets, resume=resumes > 0, log=out / "train.log")
        print(f"chaos: vime train exited {rc} (run {resumes + 1})", flush=True)
        if rc == 2:  # a usage or config error: no fault of ours to resume from
            break
    injector.stop.set()
    injector.join(timeout=5)
    time.sleep(2)
    orphans = sorted(engine_family() - before) + [p.pid for p in processes("ray::MegatronWorker")]
    report = {
        "card": "CPU (no accelerator)",
        "recipe": a.config,
        "seed": a.seed,
        "steps": a.steps,
        "faults_injected": len(injector.injected),
        "by_kind": {k: sum(f["kind"] == k for f in injector.injected) for k in ("engine", "hang", "trainer")},
        "completed": rc == 0,
        "resumes": resumes,
        "orphans": len(orphans),
        "seconds": round(time.time() - t0, 1),
        **audit(out, a.steps, cfg.rollout.batch_size, cfg.rollout.n_samples),
    }
    report["faults_survived"] = report["faults_injected"] if rc == 0 else 0
    print(json.dumps(report, indent=1))
    write("chaos_cpu", report, ROOT / "benchmarks" / "results")
    keys = ("faults_injected", "faults_survived", "resumes", "lost", "duplicated", "orphans")
    bar_png(
        "chaos_cpu",
        list(keys),
        [float(report[k]) for k in keys],
        "count",
        f"chaos on CPU: {report['expected']} samples expected over {a.steps} steps",
        ROOT / "benchmarks" / "results",
    )
    return 0 if rc == 0 and report["lost"] == report["duplicated"] == report["orphans"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
