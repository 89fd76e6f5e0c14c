"""Estimators, losses, KL estimators and aggregation modes against hand-computed values on small tensors, with the
edge cases that break them: all-equal rewards, a group of one, an empty response, masked tool tokens."""

from __future__ import annotations

import math

import pytest
import torch

from vime.algorithms.aggregation import aggregate, token_weights
from vime.algorithms.estimators import ESTIMATORS
from vime.algorithms.kl import kl_term
from vime.algorithms.losses import LOSSES

T = torch.tensor


def est(name, rewards, mask, groups, values=None, **kw):
    return ESTIMATORS.get(name)(T(rewards), T(mask), T(groups), None if values is None else T(values), **kw)


def close(a, b, tol=1e-4):
    return torch.allclose(a, T(b, dtype=torch.float32), atol=tol)


@pytest.mark.parametrize("std, value", [("unbiased", 0.5 / math.sqrt(1 / 3)), ("population", 1.0), ("none", 0.5)])
def test_grpo_std_conventions(std, value):
    adv, ret = est("grpo", [1.0, 0.0, 1.0, 0.0], [[1, 1]] * 4, [0, 0, 0, 0], std=std)
    assert close(adv[:, 0], [value, -value, value, -value]) and close(ret[:, 1], [1, 0, 1, 0])


def test_grpo_edge_cases_and_dr_grpo():
    # group 0 all-equal, group 1 of one, group 2 with an empty response (mask 0): nothing to prefer → 0
    adv, _ = est("grpo", [1.0, 1.0, 0.7, 1.0, 0.0], [[1, 1], [1, 0], [1, 1], [0, 0], [1, 1]], [0, 0, 1, 2, 2])
    assert close(adv[:3], [[0, 0], [0, 0], [0, 0]]) and close(adv[3], [0, 0])
    adv, _ = est("dr_grpo", [1.0, 0.0, 0.0], [[1, 1, 0]] * 3, [5, 5, 5])
    assert close(adv, [[2 / 3, 2 / 3, 0], [-1 / 3, -1 / 3, 0], [-1 / 3, -1 / 3, 0]])


def test_rloo_leaves_one_out():
    adv, _ = est("rloo", [1.0, 0.0, 0.0, 3.0], [[1]] * 4, [0, 0, 0, 1])
    assert close(adv[:, 0], [1.0, -0.5, -0.5, 0.0])  # the group of one has no baseline


def test_reinforce_plus_plus_whitens_over_tokens_and_discounts_past_tool_tokens():
    adv, ret = est("reinforce_plus_plus", [1.0, 0.0], [[1, 1, 0], [1, 1, 1]], [0, 1])
    assert close(ret, [[1, 1, 0], [0, 0, 0]])
    s = math.sqrt(0.24)  # 5 tokens: mean 0.4, variance (2·0.36 + 3·0.16)/5
    assert close(adv, [[0.6 / s, 0.6 / s, 0], [-0.4 / s] * 3])
    # gamma 0.5, a tool token (mask 0) in the middle: it neither discounts nor receives
    _, ret = est("reinforce_plus_plus", [1.0], [[1, 0, 1]], [0], gamma=0.5)
    assert close(ret, [[0.5, 0.0, 1.0]])
    # per-token rewards (an outcome plus a KL penalty per token) are summed backwards
    _, ret = est("reinforce_plus_plus", [[-0.1, -0.1, 0.9]], [[1, 1, 1]], [0])
    assert close(ret, [[0.7, 0.8, 0.9]])


def test_reinforce_plus_plus_baseline_subtracts_the_group_mean_first():
    _, ret = est("reinforce_plus_plus_baseline", [1.0, 0.0, 5.0], [[1, 1]] * 3, [0, 0, 1])
    assert close(ret, [[0.5, 0.5], [-0.5, -0.5], [0, 0]])


def test_gae_hand_values_skip_tool_tokens_and_need_a_critic():
    adv, ret = est("gae", [1.0], [[1, 1]], [0], values=[[0.5, 0.5]], gamma=1.0, lam=1.0)
    assert close(adv, [[0.5, 0.5]]) and close(ret, [[1.0, 1.0]])
    adv, _ = est("gae", [1.0], [[1, 1]], [0], values=[[0.5, 0.5]], gamma=1.0, lam=0.5)
    assert close(adv, [[0.25, 0.5]])
    # the tool token's value (9) is never used: the next sampled token's value bootstraps
    adv, _ = est("gae", [1.0], [[1, 0, 1]], [0], values=[[0.2, 9.0, 0.4]], gamma=1.0, lam=1.0)
    assert close(adv, [[0.8, 0.0, 0.6]])
    with pytest.raises(ValueError, match="needs a critic"):
        est("gae", [1.0], [[1]], [0])
    # whitened (verl's PPO): zero mean, unit std over the sampled tokens; the critic's targets stay unwhitened
    adv, ret = est(
        "gae", [1.0, 0.0], [[1, 0, 1], [1, 1, 0]], [0, 1], [[0.2, 9, 0.4], [0.5, 0.1, 7]], whiten_advantages=True
    )
    m = T([[1, 0, 1], [1, 1, 0]]).bool()
    assert abs(adv[m].mean()) < 1e-6 and abs(adv[m].std(unbiased=False) - 1) < 1e-4 and (adv[~m] == 0).all()
    assert close(ret, [[0.2 + 0.77, 0.0, 1.0], [0.5 - 0.495, 0.0, 0.0]])  # λ-returns (λ 0.95): V + unwhitened GAE


def grad_of(name, logp, adv, old, **kw):
    logp = T(logp, requires_grad=True)
    mb = {"advantages": T(adv), "old_logprobs": T(old), "loss_mask": torch.ones_like(logp)}
    loss, metrics = LOSSES.get(name)(logp, mb, **kw)
    loss.sum().backward()
    return loss.detach(), metrics, logp.grad


def test_ppo_clip_and_dual_clip():
    r = math.log(1.5)
    loss, m, g = grad_of("ppo", [[r, r]], [[1.0, -1.0]], [[0.0, 0.0]])
    assert close(loss, [[-1.2, 1.5]]) and close(m["clip_frac"], [[1.0, 0.0]])
    assert close(g, [[0.0, 1.5]])  # the clipped token gets no gradient
    loss, m, _ = grad_of("ppo", [[math.log(5.0)]], [[-1.0]], [[0.0]], dual_clip=3.0)
    assert close(loss, [[3.0]]) and close(m["dual_clip_frac"], [[1.0]])
    loss, _, _ = grad_of("ppo", [[r]], [[1.0]], [[0.0]], clip_high=0.28)  # DAPO's clip-higher
    assert close(loss, [[-1.28]])


def test_gspo_uses_one_ratio_per_sequence():
    seq = math.exp(0.2)  # geometric mean of token ratios e^0.1 and e^0.3
    loss, m, g = grad_of("gspo", [[0.1, 0.3]], [[-1.0, -1.0]], [[0.0, 0.0]])
    assert close(m["ratio"], [[seq, seq]]) and close(loss, [[seq, seq]]) and close(g, [[seq, seq]])
    loss, m, g = grad_of("gspo", [[0.1, 0.3]], [[1.0, 1.0]], [[0.0, 0.0]])
    assert close(loss, [[-1.0004, -1.0004]]) and close(g, [[0.0, 0.0]]) and close(m["clip_frac"], [[1, 1]])


def test_cispo_clips_the_weight_but_keeps_every_gradient_and_reinforce_has_no_ratio():
    _, m, g = grad_of("cispo", [[0.5]], [[1.0]], [[0.0]])
    assert close(g, [[-1.28]]) and close(m["clip_frac"], [[1.0]])
    _, _, g = grad_of("reinforce", [[0.5, -2.0]], [[2.0, -1.0]], [[9.0, 9.0]])
    assert close(g, [[-2.0, 1.0]])


def test_kl_estimators_and_kl_term_in_a_loss():
    logp, ref = T([0.0]), T([math.log(0.5)])
    lr = math.log(2)
    assert close(kl_term(logp, ref, "k1"), [lr])
    assert close(kl_term(logp, ref, "k2"), [0.5 * lr**2])
    assert close(kl_term(logp, ref, "k3"), [0.5 - 1 + lr])
    assert close(kl_term(ref, ref, "k3"), [0.0])  # policy = reference: no KL
    mb = {"advantages": T([[0.0]]), "ref_logprobs": T([[math.log(0.5)]]), "loss_mask": T([[1.0]])}
    loss, m = LOSSES.get("ppo")(T([[0.0]]), mb, kl_coef=0.1, kl_estimator="k1")
    assert close(loss, [[0.1 * lr]]) and close(m["kl_ref"], [[lr]])


TOK = T([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [7.0, 7.0, 7.0]])
MASK = T([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the third response is empty


@pytest.mark.parametrize(
    "mode, value",
    [
        ("token-mean", 2.0),
        ("seq-mean-token-sum", 3.0),
        ("seq-mean-token-mean", 2.25),
        ("seq-mean-token-sum-norm", 0.75),
    ],
)
def test_aggregation_modes_and_micro_batches_agree(mode, value):
    assert close(aggregate(TOK, MASK, mode, max_len=4), value)
    # the same batch in three micro-batches, each weighted with the global counts, sums to the same loss
    parts = sum(
        (TOK[i : i + 1] * token_weights(MASK[i : i + 1], mode, n_tokens=3, n_seqs=2, max_len=4)).sum() for i in range(3)
    )
    assert close(parts, value)


def test_unknown_names_say_what_exists():
    with pytest.raises(Exception, match="algorithm.estimator") as e:
        ESTIMATORS.get("nope")
    assert "grpo" in str(e.value)
    with pytest.raises(ValueError, match="algorithm.aggregation"):
        token_weights(MASK, "mean-of-means", n_tokens=1, n_seqs=1)


def test_presets_fill_what_a_recipe_leaves_unset_and_bad_values_name_their_key():
    from pydantic import ValidationError

    from vime.algorithms.recipe import AlgorithmConfig

    c = AlgorithmConfig(name="dr_grpo")
    assert (c.estimator, c.aggregation) == ("dr_grpo", "seq-mean-token-sum-norm")
    c = AlgorithmConfig(name="dapo", aggregation="seq-mean-token-mean", clip_high=0.28)
    assert (c.estimator, c.aggregation, c.loss_kwargs()["clip_high"]) == ("grpo", "seq-mean-token-mean", 0.28)
    with pytest.raises(ValidationError, match="algorithm.aggregation='mean'"):
        AlgorithmConfig(aggregation="mean")
    from vime.config import Config

    with pytest.raises(ValidationError, match="gae .PPO. needs a critic"):
        Config(model={"path": "m"}, data={"path": "d.jsonl"}, algorithm={"name": "ppo"})
    with pytest.raises(ValidationError, match="'critic:' is set but algorithm.estimator='grpo' uses no values"):
        Config(model={"path": "m"}, data={"path": "d.jsonl"}, critic={})
    with pytest.raises(ValidationError, match="critic.world_size .2. must equal trainer.world_size .1."):
        Config(model={"path": "m"}, data={"path": "d.jsonl"}, algorithm={"name": "ppo"}, critic={"world_size": 2})
    c = Config(model={"path": "m"}, data={"path": "d.jsonl"}, algorithm={"name": "ppo"}, critic={"lr": 1e-3})
    assert (c.algorithm.estimator, c.critic and c.critic.lr) == ("gae", 1e-3)


def test_assign_advantages_runs_the_estimator_over_the_batch():
    from vime.algorithms.recipe import AlgorithmConfig, assign_advantages
    from vime.types import Sample

    def sample(reward, n, mask=None):
        return Sample(prompt_ids=[1], response_ids=list(range(n)), logprobs=[0.0] * n, loss_mask=mask, reward=reward)

    groups = [[sample(1.0, 2), sample(0.0, 3, [1, 0, 1])], [sample(5.0, 1)]]
    out = assign_advantages(groups, AlgorithmConfig(name="rloo"))
    assert [s.token_advantages for s in out] == [[1.0, 1.0], [-1.0, 0.0, -1.0], [0.0]]
    assert [s.advantage for s in out] == [1.0, -1.0, 0.0]


def test_ppo_epochs_and_mini_batches_walk_the_batch_with_the_same_old_logprobs():
    import random

    from vime.update import updates

    steps = updates(5, epochs=2, size=2)
    assert steps == [[0, 1], [2, 3], [4]] * 2  # epoch 2 reuses the log-probs taken before epoch 1, by index
    assert updates(5, epochs=1, size=None) == [[0, 1, 2, 3, 4]]
    # shuffled: each epoch covers every sample once, in its own order, and the same seed gives the same order
    shuffled = updates(8, epochs=3, size=2, rng=random.Random(4))
    epochs = [[j for step in shuffled[i : i + 4] for j in step] for i in range(0, 12, 4)]
    assert all(sorted(e) == list(range(8)) for e in epochs) and len({tuple(e) for e in epochs}) == 3
    assert shuffled == updates(8, epochs=3, size=2, rng=random.Random(4))


def mismatch_batch():
    # trainer old log-probs vs the engine's: token ratios 1, 2 and 4 (sequence ratio 8, geometric mean 2)
    return {
        "old_logprobs": T([[0.0, math.log(2), math.log(4)]]),
        "rollout_logprobs": T([[0.0, 0.0, 0.0]]),
        "loss_mask": T([[1.0, 1.0, 1.0]]),
    }


@pytest.mark.parametrize(
    "tis, mis, loss, metric, value",
    [
        ({"level": "token", "cap": 2.0}, None, [1, 2, 2], "tis_capped_frac", [0, 0, 1]),
        ({"level": "sequence", "cap": 2.0}, None, [2, 2, 2], "tis_capped_frac", [1, 1, 1]),
        (None, {"level": "token", "low": 0.5, "high": 2.0}, [1, 1, 0], "mis_masked_frac", [0, 0, 1]),
        (None, {"level": "geometric", "low": 0.5, "high": 2.0}, [1, 1, 1], "mis_masked_frac", [0, 0, 0]),
        (None, {"level": "geometric", "low": 0.5, "high": 1.9}, [0, 0, 0], "mis_masked_frac", [1, 1, 1]),
        (None, {"level": "sequence", "low": 0.5, "high": 2.0}, [0, 0, 0], "mis_masked_frac", [1, 1, 1]),
    ],
)
def test_tis_and_mis_against_the_engine_log_probs(tis, mis, loss, metric, value):
    from vime.algorithms.correction import correct

    out, metrics = correct(torch.ones(1, 3), mismatch_batch(), tis=tis, mis=mis)
    assert close(out, [loss]) and close(metrics[metric], [value])
    assert close(metrics["mismatch_abs_log_ratio"], [[0, math.log(2), math.log(4)]])


def test_no_correction_without_engine_log_probs_and_padding_rows_keep_old_logprobs():
    from trainers.megatron.batching import microbatches
    from vime.algorithms.correction import correct

    mb = mismatch_batch()
    del mb["rollout_logprobs"]
    out, metrics = correct(torch.ones(1, 3), mb, tis={"cap": 2.0})
    assert close(out, [[1, 1, 1]]) and metrics == {}
    # 3 samples in micro-batches of 2: the padding row in the second must not drop its old log-probs
    rows = [{"prompt_ids": [1, 2], "response_ids": [3, 4], "logprobs": [-1.0, -2.0], "old_logprobs": [-0.5, -0.7]}] * 3
    mbs, _ = microbatches(rows, 2)
    assert all("old_logprobs" in m and "rollout_logprobs" in m for m in mbs)
    assert close(mbs[1]["old_logprobs"][0, 1:3], [-0.5, -0.7]) and close(mbs[1]["rollout_logprobs"][0, 1:3], [-1, -2])


def test_overlong_shaping_ramps_to_minus_one_over_the_buffer():
    from vime.algorithms.recipe import AlgorithmConfig, assign_advantages, overlong_penalty
    from vime.types import Sample

    assert [overlong_penalty(n, 10, 4) for n in (5, 6, 7, 8, 10, 12)] == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    group = [
        Sample(prompt_ids=[1], response_ids=[5] * n, logprobs=[0.0] * n, reward=1.0, group_id="g") for n in (4, 10)
    ]
    out = assign_advantages([group], AlgorithmConfig(name="dr_grpo", overlong_buffer=4), max_len=10)
    assert [s.advantage for s in out] == [0.5, -0.5]  # rewards 1 and 0 after shaping, mean-centred


def test_kl_in_reward_is_taken_off_each_token_and_the_advantages_estimated_again():
    from vime.algorithms.recipe import AlgorithmConfig
    from vime.data.batch import kl_penalty, reestimate
    from vime.types import Sample

    algo = AlgorithmConfig(name="reinforce_plus_plus", kl_coef=0.5, kl_estimator="k1", kl_in_reward=True)
    assert algo.loss_kwargs()["kl_coef"] == 0.0  # in the reward, not also in the loss
    batch = [Sample(prompt_ids=[1], response_ids=[7, 8], logprobs=[0.0, 0.0], reward=1.0, group_id="g")]
    returns = reestimate(batch, algo, 8, kl_penalty([[0.0, 0.0]], [[-0.2, -0.4]], algo))
    # token rewards -0.1 and 1 - 0.2 = 0.8 (k1 = 0.2, 0.4 times 0.5); returns 0.7 and 0.8, then whitened
    assert close(T(batch[0].token_advantages), [-1.0, 1.0], tol=1e-3) and close(T(returns), [[0.7, 0.8]])


def test_gae_advantages_from_the_critics_values_come_back_in_batch_order():
    """The batch interleaves two groups; `reestimate` groups them for the estimator and hands the returns back in
    the batch's order (a mix-up would give a sample another one's targets)."""
    from vime.algorithms.recipe import AlgorithmConfig
    from vime.data.batch import reestimate
    from vime.types import Sample

    def s(g, reward, n):
        return Sample(prompt_ids=[1], response_ids=[5] * n, logprobs=[0.0] * n, reward=reward, group_id=g)

    batch = [s("a", 1.0, 2), s("b", 0.0, 1), s("a", 0.0, 3)]
    algo = AlgorithmConfig(name="ppo", lam=1.0, whiten_advantages=False)
    values = [[0.5, 0.25], [0.1], [0.0, 0.0, 0.3]]
    returns = reestimate(batch, algo, 8, values=values)
    assert returns == [[1.0, 1.0], [0.0], [0.0, 0.0, 0.0]]
    got = [b.token_advantages for b in batch]
    assert all(close(T(g), w) for g, w in zip(got, [[0.5, 0.75], [-0.1], [0.0, 0.0, -0.3]])), got
