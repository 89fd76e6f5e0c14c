"""Placement: bundle plans, and joining a Ray cluster that already runs (`ray.address`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vime.placement import plan


def test_plan_separate_and_colocated():
    t, e = {"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}
    bundles, ti, ei = plan(False, 2, t, 2, e)
    assert len(bundles) == 4 and ti == [0, 1] and ei == [2, 3]
    bundles, ti, ei = plan(True, 2, t, 2, e)
    assert bundles == [{"CPU": 2, "GPU": 1}] * 2 and ti == [0, 1] and ei == [0, 1]  # one GPU shared per bundle
    bundles, ti, ei = plan(True, 1, {"CPU": 1}, 1, {"CPU": 1})
    assert bundles == [{"CPU": 2}] and ti == ei == [0]


@pytest.mark.slow
def test_trainer_joins_existing_cluster(model_dir):
    """A cluster owned by another driver process (as `ray start` would run it); vime joins it by address."""
    head = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import ray, sys; ray.init(num_cpus=2, include_dashboard=False);"
                "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()"
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        address = head.stdout.readline().strip()
        assert ":" in address
        code = (
            "import sys; sys.path.insert(0, '.');"
            "from vime.placement import RayConfig, ensure_ray;"
            f"ensure_ray(RayConfig(address={address!r}));"
            "import ray; assert ray.cluster_resources()['CPU'] == 2;"
            "from vime.trainer import TrainerConfig; from vime.specs import make_trainer;"
            "from vime.types import Sample;"
            f"tr = make_trainer(TrainerConfig(), {str(model_dir('qwen2'))!r});"
            "print(len(tr.logprobs([Sample(prompt_ids=[1, 5, 6], response_ids=[7, 8], logprobs=[0.0, 0.0])])[0]));"
            "tr.shutdown()"
        )
        # Ray 2.60 local clusters use token auth (token in ~/.ray/auth_token); a joining driver opts in
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, check=False
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1] == "2"
    finally:
        head.stdin.close()
        head.wait(timeout=120)
