"""The staleness bound and the async loop's pieces that need no engine: per-token versions, the bound at the
trainer's door, partial-rollout masking, the feed's in-flight bookkeeping and the buffer's blocking wait."""

from __future__ import annotations

import json
import threading
import time

import pytest

from vime.algorithms.recipe import AlgorithmConfig
from vime.config import ConfigError, load_config
from vime.data.batch import training_batch
from vime.data.buffer import DataBuffer
from vime.data.source import DataConfig, PromptSource
from vime.loop_async import Feed
from vime.staleness import check_bound, mask_older_versions, split_stale, staleness, staleness_metrics
from vime.types import Sample


def sample(versions, mask=None, reward=1.0, group="g", index=0, row=None):
    n = len(versions)
    return Sample(
        prompt_ids=[1],
        response_ids=list(range(2, 2 + n)),
        logprobs=[-1.0] * n,
        loss_mask=mask or [1] * n,
        weight_versions=versions,
        reward=reward,
        group_id=group,
        index=index,
        metadata={} if row is None else {"data_index": row},
    )


def test_staleness_counts_only_sampled_tokens():
    s = sample(["step1", "step1", "step3"], mask=[0, 1, 1])  # the step1 token at 0 is tool text
    assert staleness(s, 4) == 3  # the oldest *sampled* token is step1 (position 1)
    s.loss_mask[1] = 0
    assert staleness(s, 4) == 1
    assert staleness(sample(["default"]), 0) == 1  # the model directory's weights are older than any push
    with pytest.raises(ValueError, match="carries no per-token weight versions"):
        staleness(Sample(prompt_ids=[1], response_ids=[2], logprobs=[-1.0]), 0)
    with pytest.raises(ValueError, match="'v7' is not one the loop pushed"):
        staleness(sample(["v7"]), 0)


def test_a_positive_bound_bounds_instead_of_switching_the_check_off():
    """The old check refused stale tokens only when max_staleness was 0; any k > 0 let everything through."""
    groups = [[sample(["step1"] * 3, reward=0.0, index=0), sample(["step1"] * 3, reward=1.0, index=1)]]
    algo = AlgorithmConfig()
    assert len(training_batch(groups, algo, "step3", 2)) == 2
    with pytest.raises(RuntimeError, match=r"2 weight versions behind the trainer \(step3.*max_staleness=1"):
        training_batch(groups, algo, "step3", 1)
    with pytest.raises(RuntimeError, match="max_staleness=0"):
        training_batch(groups, algo, "step2", 0)
    assert len(training_batch(groups, algo, "step1", 0)) == 2  # sync: on-policy


def test_partial_rollout_tokens_masked_or_kept():
    spanning = sample(["step2", "step2", "step3", "step3"], mask=[1, 0, 1, 1])
    kept = sample(list(spanning.weight_versions), mask=list(spanning.loss_mask))
    assert staleness(kept, 3) == 1  # kept: judged by its oldest sampled token
    assert mask_older_versions(spanning) == 1  # the one sampled step2 token (the other is tool text)
    assert spanning.loss_mask == [0, 0, 1, 1] and staleness(spanning, 3) == 0
    assert mask_older_versions(spanning) == 0  # one version left: nothing more to mask
    m = staleness_metrics([kept, sample(["step3"] * 2)], 3)
    assert m["staleness/frac_0"] == 0.5 and m["staleness/frac_1"] == 0.5 and m["staleness/max"] == 1.0
    assert m["staleness/spanning_push_frac"] == 0.5


def test_split_stale_moves_whole_groups():
    ok = [sample(["step4"]), sample(["step4"], index=1)]
    mixed = [sample(["step4"], group="h"), sample(["step2", "step4"], group="h", index=1)]
    fresh, stale = split_stale([ok, mixed], trainer_version=5, bound=2)
    assert fresh == [ok] and stale == [mixed]
    check_bound([s for g in fresh for s in g], 5, 1)
    with pytest.raises(RuntimeError, match="3 weight versions behind"):
        check_bound(mixed, 5, 2)


RECIPE = """
model: {path: m}
data: {path: d.jsonl}
loop: {mode: async, max_staleness: 1}
algorithm: {old_logprobs: rollout}
"""


@pytest.mark.parametrize(
    "change, message",
    [
        ("placement: {colocate: true}", "needs split placement"),
        ("weights: {pause_mode: abort}", "pause_mode=abort"),
        ("loop: {mode: async, max_staleness: 0}", "max_staleness >= 1"),
        ("algorithm: {old_logprobs: recompute}", "set algorithm.old_logprobs=rollout, or algorithm.tis"),
    ],
)
def test_async_recipes_that_would_be_silently_wrong_are_refused(tmp_path, change, message):
    p = tmp_path / "r.yaml"
    key = change.split(":")[0]
    text = "\n".join(line for line in RECIPE.splitlines() if not line.startswith(key + ":"))
    p.write_text(text + "\n" + change + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(p)
    p.write_text(RECIPE)
    assert load_config(p).loop.mode == "async"
    p.write_text(RECIPE.replace("{old_logprobs: rollout}", "{tis: {cap: 2.0}}"))
    assert load_config(p).algorithm.tis is not None  # recomputed old log-probs plus TIS see the sampler too


def source(tmp_path, n=10):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"p{i}", "label": str(i)}) + "\n" for i in range(n)))
    return PromptSource(DataConfig(path=str(p), shuffle=False))


def group_for(rec):
    return [sample(["step0"], row=rec["index"]), sample(["step0"], index=1, row=rec["index"])]


def test_feed_checkpoint_holds_ready_and_in_flight_prompts(tmp_path):
    """What a checkpoint taken mid-rollout holds gives back every drawn prompt exactly once on resume."""
    feed = Feed(source(tmp_path), DataBuffer())
    staging = DataBuffer()
    landed = feed.draw(3)
    staging.add(group_for(r) for r in landed)
    feed.land(staging)
    in_flight = feed.draw(2)  # drawn, rollout running
    state = json.loads(json.dumps(feed.state_dict()))
    assert state["reissue"] == [r["index"] for r in in_flight]
    resumed = Feed(source(tmp_path), DataBuffer())
    resumed.source.load_state_dict(state["source"])
    resumed.load_state_dict(state)
    ready_rows = [g[0].metadata["data_index"] for g in resumed.ready.pop_groups()]
    again = [r["index"] for r in resumed.draw(4)]
    assert ready_rows == [r["index"] for r in landed]
    assert again[:2] == [r["index"] for r in in_flight] and again[2:] == [5, 6]  # then new prompts
    assert sorted(ready_rows + again) == list(range(7))  # nothing lost, nothing twice
    stale = [group_for(landed[0])]
    resumed.regenerate(stale)
    assert [r["index"] for r in resumed.draw(1)] == [landed[0]["index"]]
    with pytest.raises(RuntimeError, match="name no data row"):
        resumed.regenerate([[sample(["step0"])]])


def test_buffer_wait_wakes_on_add_and_times_out_naming_what_it_waited_for():
    buf = DataBuffer()
    threading.Timer(0.2, lambda: buf.add([[sample(["step0"])]])).start()
    t = time.monotonic()
    buf.wait_for(lambda: len(buf) >= 1, 10, "a group")
    assert time.monotonic() - t < 5
    with pytest.raises(TimeoutError, match=r"waited 0 s for 2 rollout groups; the buffer holds 1 groups"):
        buf.wait_for(lambda: len(buf) >= 2, 0.3, "2 rollout groups")
