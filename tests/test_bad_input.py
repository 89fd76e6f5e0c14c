"""Bad input: each case fails before anything starts, or is skipped and counted, with a message that names the
key, the file or the data row to fix."""

from __future__ import annotations

import json
import logging

import plugins
import pytest

from vime import parts
from vime.config import ConfigError, load_config
from vime.loop import train
from vime.metrics import MetricsLogger
from vime.preflight import PreflightError
from vime.rollout.faults import RolloutFailure
from vime.run_rollout import run_rollout


@pytest.fixture
def recipe(repo_root, model_dir, tmp_path):
    def make(*extra: str):
        return load_config(
            repo_root / "configs" / "grpo_tiny_cpu.yaml",
            [
                f"model.path={model_dir('qwen2')}",
                f"data.path={repo_root}/examples/arithmetic/train.jsonl",
                f"data.eval_path={repo_root}/examples/arithmetic/eval.jsonl",
                f"run.out_dir={tmp_path}/run",
                "engine.args.max_model_len=512",
                *extra,
            ],
        )

    return make


@pytest.fixture
def nothing_starts(monkeypatch):
    """Preflight must fail before Ray (and so engines and trainer) start."""

    def started(*_a, **_k):
        raise AssertionError("Ray was started: the check should have failed before")

    monkeypatch.setattr(parts, "ensure_ray", started)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.path=/nonexistent/model", "model.path='/nonexistent/model' is not a Hugging Face model directory"),
        ("rollout.reward=mypkg.rewards:nope", "rollout.reward"),
        ("rollout.group_filters=[drop_everything]", "unknown group filter 'drop_everything' (rollout.group_filters)"),
        ("algorithm.loss=ppo2", "unknown loss 'ppo2' (algorithm.loss)"),
        ("data.epochs=1", "data.epochs=1 over"),
        ("data.eval_path=/nonexistent/eval.jsonl", "data.eval_path='/nonexistent/eval.jsonl' does not exist"),
        ("algorithm.routing_replay=true", "algorithm.routing_replay replays expert choices, but model.path="),
    ],
)
def test_preflight_names_the_key_before_anything_starts(recipe, nothing_starts, override, needle):
    with pytest.raises(PreflightError) as e:
        train(recipe(override), progress=False)
    assert needle in str(e.value)


def test_data_that_runs_out_names_epochs_and_steps(recipe, nothing_starts):
    with pytest.raises(PreflightError) as e:
        train(recipe("data.epochs=1", "loop.num_steps=1000"), progress=False)
    msg = str(e.value)
    assert "loop.num_steps=1000" in msg and "rollout.batch_size=32" in msg and "needs 32000" in msg


@pytest.mark.parametrize("override, needle", [("data.epochs=0", "data.epochs"), ("gateway.port=70000", "gateway.port")])
def test_out_of_range_values_fail_at_load(recipe, override, needle):
    with pytest.raises(ConfigError, match=f"bad value for '{needle}'"):
        recipe(override)


def test_damaged_checkpoint_names_its_file(recipe, nothing_starts, tmp_path):
    ckpt = tmp_path / "ckpt" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"step": 2, "sour')
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"checkpoint file {ckpt / 'state.json'} cannot be read"):
        train(recipe(), resume=str(ckpt), progress=False)


def test_resume_rewrites_metrics_without_repeated_steps(tmp_path):
    m = MetricsLogger(tmp_path, use_tensorboard=False)
    for step in (1, 2, 3):  # the crashed run got to step 3; its last checkpoint was at step 1
        m.log(step, {"x": float(step)})
    m.restore(m.history[:1])
    m.log(2, {"x": 2.0})
    m.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


@pytest.mark.slow
def test_one_failing_reward_is_skipped_and_counted(recipe, qwen2_engines, caplog):
    overrides = [
        "rollout.reward=plugins:reward_failing_once",
        "rollout.batch_size=4",
        "rollout.n_samples=4",
        "rollout.group_filters=[]",
    ]
    plugins.REWARD_CALLS["n"] = 0
    with caplog.at_level(logging.WARNING, logger="vime.rollout.faults"):
        summary = run_rollout(recipe(*overrides), steps=1, progress=False, engines=qwen2_engines)
    assert summary["samples"] == 4 * 4 - 1 and summary["failed/reward_errors"] == 1.0, summary
    assert "reward of sample" in caplog.text and "of data row" in caplog.text and "reward failed once" in caplog.text

    plugins.REWARD_CALLS["n"] = 0
    with pytest.raises(RolloutFailure, match="rollout.max_failures=0; the first was: reward of sample"):
        run_rollout(recipe(*overrides, "rollout.max_failures=0"), steps=1, progress=False, engines=qwen2_engines)


@pytest.mark.slow
def test_agent_errors_are_counted_and_bounded(recipe, qwen2_engines):
    """Error answers an agent swallowed are counted per step (`gateway/http_4xx`); an agent sampling at its own
    temperature is counted (`failed/sampling_mismatch`); agents that raise after their model calls are trained on
    with reward 0, counted (`failed/agent_errors`), and past `rollout.max_failure_rate` stop the run with the first
    traceback."""
    agent = ["rollout.function=vime.rollout.agent:agent_rollout", "gateway.model_name=vime", "rollout.group_filters=[]"]
    small = ["rollout.batch_size=2", "rollout.n_samples=2"]
    summary = run_rollout(
        recipe(*agent, *small, "rollout.agent=plugins:agent_recovering_from_an_error"),
        steps=1,
        progress=False,
        engines=qwen2_engines,
    )
    assert summary["samples"] == 4 and summary["gateway/http_4xx"] == 4, summary
    raising = recipe(*agent, *small, "rollout.agent=plugins:agent_raising_after_a_call")
    summary = run_rollout(raising, steps=1, progress=False, engines=qwen2_engines)
    assert summary["samples"] == 4 and summary["failed/agent_errors"] == 4 and summary["mean_reward"] == 0, summary
    summary = run_rollout(
        recipe(*agent, *small, "rollout.agent=plugins:agent_at_its_own_temperature"),
        steps=1,
        progress=False,
        engines=qwen2_engines,
    )
    assert summary["samples"] == 4 and summary["failed/sampling_mismatch"] == 4, summary  # counted, never silent
    raising.rollout.max_failure_rate = 0.5
    with pytest.raises(RolloutFailure, match=r"(?s)4 of 4 rollout items failed.*max_failure_rate=0.5.*tool crashed"):
        run_rollout(raising, steps=1, progress=False, engines=qwen2_engines)


@pytest.mark.slow
def test_hanging_reward_times_out_and_async_rewards_are_awaited(recipe, qwen2_engines, caplog):
    overrides = ["rollout.batch_size=4", "rollout.n_samples=4", "rollout.group_filters=[]"]
    plugins.REWARD_CALLS["n"] = 0
    plugins.RELEASE.clear()
    plugins.HUNG_DONE.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="vime.rollout.faults"):
            summary = run_rollout(
                recipe("rollout.reward=plugins:reward_hanging_once", "rollout.reward_timeout_s=2", *overrides),
                steps=1,
                progress=False,
                engines=qwen2_engines,
            )
        # the step ended with the verifier still hung: abandoned, not waited for (asyncio.run joins its executor)
        assert not plugins.HUNG_DONE.is_set()
    finally:
        plugins.RELEASE.set()  # let the abandoned thread end
    assert summary["samples"] == 4 * 4 - 1 and summary["failed/reward_timeouts"] == 1.0, summary
    assert "rollout.reward_timeout_s=2" in caplog.text and "of data row" in caplog.text
    summary = run_rollout(
        recipe("rollout.reward=plugins:async_reward", *overrides), steps=1, progress=False, engines=qwen2_engines
    )
    assert summary["samples"] == 16 and 0 < summary["mean_reward"] < 1, summary


@pytest.mark.slow
def test_dynamic_sampling_refills_the_groups_the_filter_dropped(recipe, qwen2_engines):
    overrides = [
        "rollout.reward=plugins:reward_uniform_on_even_rows",
        "rollout.batch_size=6",
        "rollout.n_samples=2",
        "rollout.group_filters=[drop_uniform_reward]",
    ]
    plain = run_rollout(recipe(*overrides), steps=1, progress=False, engines=qwen2_engines)
    assert plain["groups_kept"] < 6 and plain["rollout/sampling_rounds"] == 1, plain
    full = run_rollout(
        recipe(*overrides, "rollout.dynamic_sampling={over_sampling: 2.0, max_rounds: 6}"),
        steps=1,
        progress=False,
        engines=qwen2_engines,
    )
    assert full["groups_kept"] == 6 and full["rollout/sampling_rounds"] > 1, full
    assert full["samples/expected"] > 6 * 2 and full["samples/dropped_by_filter"] > 0, full


def test_dynamic_sampling_needs_a_filter(recipe):
    with pytest.raises(ConfigError, match="rollout.dynamic_sampling refills groups"):
        recipe("rollout.group_filters=[]", "rollout.dynamic_sampling={max_rounds: 2}")


@pytest.mark.slow
def test_prompt_too_long_is_skipped_and_names_its_row(recipe, qwen2_engines, tmp_path, caplog):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{i}+1=", "label": str(i + 1)} for i in range(3)] + [{"prompt": "1+1=" * 400, "label": "2"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = recipe(
        f"data.path={data}",
        "data.shuffle=false",
        "rollout.batch_size=4",
        "rollout.n_samples=2",
        "rollout.group_filters=[]",
    )
    with caplog.at_level(logging.WARNING, logger="vime.rollout.faults"):
        summary = run_rollout(cfg, steps=1, progress=False, engines=qwen2_engines)
    assert summary["samples"] == 3 * 2 and summary["failed/prompts_too_long"] == 1.0, summary
    assert f"data row 3 of {data}" in caplog.text and "exceed the engine's context of 512" in caplog.text


def test_nonfinite_updates_are_bounded_and_the_first_is_named(caplog):
    from types import SimpleNamespace

    from vime.update import skipped_nonfinite

    run = SimpleNamespace(nonfinite=[], cfg=SimpleNamespace(loop=SimpleNamespace(max_nonfinite_steps=1)))
    skipped_nonfinite(run, {"loss": float("nan"), "tokens": 40.0})  # within the bound: a warning
    assert "update skipped" in caplog.text
    with pytest.raises(FloatingPointError, match=r"loop.max_nonfinite_steps=1; the first: loss nan, batch of 40"):
        skipped_nonfinite(run, {"loss": float("inf"), "tokens": 8.0})
