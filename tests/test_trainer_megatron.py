"""The Megatron-core trainer on real CPU processes (Ray actors, gloo): parity with transformers, TP/PP,
training steps, export and exact checkpoint resume."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import hf_response_logprobs, make_samples, start_engines
from transformers import AutoModelForCausalLM

from vime.trainer import TrainerConfig
from vime.types import SamplingParams

pytestmark = pytest.mark.slow


def trainer(model_path, **kw):
    from trainers.megatron.trainer import MegatronTrainer

    kw.setdefault("micro_batch_size", 2)
    kw.setdefault("world_size", kw.get("tp", 1) * kw.get("pp", 1))
    return MegatronTrainer(TrainerConfig(**kw), model_path=str(model_path))


def hf(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager")


def check_logits(tr, model, tokens):
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0]
    got = tr.forward_logits(tokens)
    assert got.shape == ref.shape
    return (got - ref).abs().max().item()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_logits_match_transformers_tp1(ray_cluster, model_dir, arch):
    tokens = make_samples(1, seed=1)[0]
    tokens = tokens.prompt_ids + tokens.response_ids
    with trainer(model_dir(arch)) as tr:
        assert check_logits(tr, hf(model_dir(arch)), tokens) < 1e-4
        sd = {k: v for bucket in tr.weights(bucket_bytes=64 << 10) for k, v in bucket}
    model = hf(model_dir(arch))
    ref = model.state_dict()
    if model.config.tie_word_embeddings:
        ref.pop("lm_head.weight")
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)


@pytest.mark.parametrize("arch, tp, pp", [("qwen2", 2, 1), ("qwen3", 1, 2), ("llama", 1, 2)])
def test_logits_match_transformers_tp2_pp2(ray_cluster, model_dir, arch, tp, pp):
    s = make_samples(1, seed=2)[0]
    with trainer(model_dir(arch), tp=tp, pp=pp) as tr:
        assert check_logits(tr, hf(model_dir(arch)), s.prompt_ids + s.response_ids) < 1e-4
        sd = {k: v for bucket in tr.weights(bucket_bytes=64 << 10) for k, v in bucket}
    ref = hf(model_dir(arch)).state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in sd) and len(sd) >= len(ref) - 1


def run_steps(tr, samples, n=3):
    out = []
    for i in range(n):
        for j, s in enumerate(samples):
            s.advantage = 1.0 if (i + j) % 2 else -0.5
        out.append(tr.train_step(samples, "policy"))
    return out


def test_tp2_training_equals_tp1_and_policy_step_moves_logprobs(ray_cluster, model_dir):
    samples = make_samples(6, seed=3)
    with trainer(model_dir("qwen2"), lr=1e-3) as tr:
        before = tr.logprobs(samples)
        m1 = run_steps(tr, samples)
        lp1 = tr.logprobs(samples)
    with trainer(model_dir("qwen2"), tp=2, lr=1e-3) as tr:
        m2 = run_steps(tr, samples)
        lp2 = tr.logprobs(samples)
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] / b["grad_norm"] - 1) < 1e-5
    # fp32 sum-order noise, amplified by three Adam steps at lr 1e-3 (measured 1e-5; a TP bug is off by >1e-3)
    assert max(abs(x - y) for a, b in zip(lp1, lp2) for x, y in zip(a, b)) < 5e-5
    # a policy step raises the log-probs of positive-advantage samples
    with trainer(model_dir("qwen2"), lr=1e-3) as tr:
        for j, s in enumerate(samples):
            s.advantage = 1.0 if j % 2 else -1.0
        tr.train_step(samples, "policy")
        after = tr.logprobs(samples)
    for j, (a, b) in enumerate(zip(before, after)):
        assert (sum(b) > sum(a)) == bool(j % 2), (j, sum(a), sum(b))


def test_aggregation_is_exact_over_micro_batches_and_data_parallel_ranks(ray_cluster, model_dir):
    """The same batch in 1, 2 and 4 micro-batches, and over DP=2, gives the same gradient: each micro-batch's token
    weights divide by the *global* token and response counts (a mean of means would differ here: the responses
    have 3 to 9 tokens). Both aggregations on each trainer, in the same order (lr 1e-9: the first step moves
    the weights the second is taken at by ~1e-9)."""
    samples = make_samples(8, seed=6)
    for j, s in enumerate(samples):
        s.advantage = 1.0 if j % 3 else -2.0
    modes = ["token-mean", "seq-mean-token-mean"]
    norms: dict[str, dict[tuple[int, int], float]] = {m: {} for m in modes}
    for mbs, world in [(8, 1), (4, 1), (2, 1), (2, 2)]:
        with trainer(model_dir("llama"), micro_batch_size=mbs, world_size=world, lr=1e-9) as tr:
            for mode in modes:
                norms[mode][(mbs, world)] = tr.train_step(samples, "ppo", {"aggregation": mode})["grad_norm"]
    for mode, by in norms.items():
        ref = by[(8, 1)]
        assert all(abs(n / ref - 1) < 1e-5 for n in by.values()), (mode, by)
    assert abs(norms[modes[0]][(8, 1)] / norms[modes[1]][(8, 1)] - 1) > 1e-3, norms  # the two really differ here


def test_second_epoch_moves_the_ratio_and_the_clip_acts(ray_cluster, model_dir):
    """Old log-probs are taken once: the first update is on-policy (ratio 1, nothing clipped), the second is not."""
    samples = make_samples(6, seed=7)
    for j, s in enumerate(samples):
        s.advantage = 1.0 if j % 2 else -1.0
    with trainer(model_dir("llama"), lr=3e-2) as tr:
        old = tr.logprobs(samples)
        first = tr.train_step(samples, "ppo", {"clip_low": 0.2, "clip_high": 0.2}, old_logprobs=old)
        second = tr.train_step(samples, "ppo", {"clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0}, old_logprobs=old)
    assert abs(first["ratio"] - 1) < 1e-6 and first.get("clip_frac", 0.0) == 0.0, first
    assert abs(second["ratio"] - 1) > 1e-3 and second["clip_frac"] > 0, second
    assert first["ratio_max"] == pytest.approx(1.0) and second["ratio_max"] > max(second["ratio"], 1.0), second
    assert "dual_clip_frac" in second  # every metric a loss returns is logged (no whitelist)


def test_per_token_advantages_reach_the_trainer(ray_cluster, model_dir):
    samples = make_samples(4, seed=10)
    with trainer(model_dir("llama"), lr=1e-9) as tr:
        for s in samples:
            s.advantage, s.token_advantages = 0.0, [1.0] * len(s.response_ids)
        assert tr.train_step(samples, "reinforce")["grad_norm"] > 0
        for s in samples:
            s.token_advantages = []
        assert tr.train_step(samples, "reinforce")["grad_norm"] == 0


def test_critic_values_and_value_step_are_the_same_over_tp2(ray_cluster, model_dir):
    """The critic in the policy's layout options: TP=2 gives the TP=1 values before and after a value step (its
    head is replicated, the backbone sharded as the policy's)."""
    from trainers.megatron.critic import MegatronCritic
    from vime.trainer import CriticConfig

    samples = make_samples(4, seed=13)
    returns = [[float(j % 2)] * len(s.response_ids) for j, s in enumerate(samples)]
    out = {}
    for tp in (1, 2):
        critic = MegatronCritic(
            CriticConfig(tp=tp, world_size=tp, lr=1e-2, micro_batch_size=2), model_path=str(model_dir("qwen2"))
        )
        try:
            v0 = critic.values(samples)
            stats = critic.train_step(samples, returns, v0, {"value_clip": 0.2})
            critic.train_step(samples, returns, v0, {"value_clip": 0.2})
            out[tp] = (stats["grad_norm"], critic.values(samples))
        finally:
            critic.shutdown()
    assert abs(out[1][0] / out[2][0] - 1) < 1e-4, out
    worst = max(abs(a - b) for r1, r2 in zip(out[1][1], out[2][1]) for a, b in zip(r1, r2))
    assert worst < 1e-4 and any(v != 0 for r in out[1][1] for v in r), worst


def test_entropy_bonus_alone_raises_the_entropy(ray_cluster, model_dir):
    """With zero advantages the policy loss has no gradient; the entropy bonus alone moves the weights, towards a
    flatter distribution (the sign of a wrong bonus gradient would lower it)."""
    samples = make_samples(4, seed=12)
    with trainer(model_dir("llama"), lr=1e-2) as tr:
        assert tr.train_step(samples, "ppo")["grad_norm"] == 0
        steps = [tr.train_step(samples, "ppo", {"entropy_coef": 0.5}) for _ in range(4)]
    assert steps[0]["grad_norm"] > 0 and steps[-1]["entropy"] > steps[0]["entropy"] + 1e-3, steps


def test_kl_to_the_frozen_reference_is_zero_then_grows(ray_cluster, model_dir):
    samples = make_samples(6, seed=8)
    for j, s in enumerate(samples):
        s.advantage = 1.0 if j % 2 else -1.0
    with trainer(model_dir("llama"), tp=2, lr=3e-2) as tr:
        ref = tr.logprobs(samples, reference=True)
        assert ref == tr.logprobs(samples)  # the reference is the initial policy
        kw = {"kl_coef": 0.1, "kl_estimator": "k3"}
        first = tr.train_step(samples, "ppo", kw, old_logprobs=ref, ref_logprobs=ref)
        second = tr.train_step(samples, "ppo", kw, old_logprobs=ref, ref_logprobs=ref)
        assert tr.logprobs(samples, reference=True) == ref  # frozen: updates never reach it
        # TIS and MIS against the engine's log-probs (here 0.0 per token, far from the trainer's): all capped
        fixed = tr.train_step(samples, "ppo", {"tis": {"cap": 2.0}, "mis": {"low": 0.0, "high": 1e9}}, old_logprobs=ref)
    assert first["kl_ref"] < 1e-9 and second["kl_ref"] > 1e-4, (first, second)
    assert fixed["mis_masked_frac"] == 0.0 and fixed["mismatch_abs_log_ratio"] > 1, fixed


def test_sft_step_lowers_cross_entropy_and_set_lr_applies(ray_cluster, model_dir):
    samples = make_samples(4, seed=4)
    with trainer(model_dir("llama"), lr=3e-3) as tr:
        losses = [tr.train_step(samples, "sft")["loss"] for _ in range(4)]
        tr.set_lr(1e-5)  # the warm start's rate, then back: the optimiser must step at it (it once kept trainer.lr)
        assert tr.train_step(samples, "sft")["lr"] == pytest.approx(1e-5)
        tr.set_lr(3e-3)
        assert tr.train_step(samples, "sft")["lr"] == pytest.approx(3e-3)
    assert losses[-1] < losses[0] - 0.1


def test_reset_optimizer_starts_the_next_phase_as_a_fresh_run(ray_cluster, model_dir):
    """Warm-start steps at a negligible rate fill Adam's moments but leave the weights; after the reset, two steps
    must move the weights exactly as a fresh trainer's first two do: with the moments kept they move them along
    the warm start's gradients too, and with the schedule kept they skip the warm-up (full rate at once)."""
    warm, rl = make_samples(4, seed=6), make_samples(4, seed=7)
    with trainer(model_dir("llama"), lr=1e-3, warmup_steps=3) as fresh:
        lrs = [fresh.train_step(rl, "sft")["lr"] for _ in range(2)]
        expected = fresh.logprobs(rl)
    assert lrs[1] < 1e-3, lrs  # the two steps are inside the warm-up
    with trainer(model_dir("llama"), lr=1e-3, warmup_steps=3) as tr:
        tr.set_lr(1e-12)
        for _ in range(4):
            tr.train_step(warm, "sft")
        tr.set_lr(1e-3)
        tr.reset_optimizer()
        assert [tr.train_step(rl, "sft")["lr"] for _ in range(2)] == pytest.approx(lrs)
        got = tr.logprobs(rl)
    gap = max(abs(a - b) for x, y in zip(got, expected, strict=True) for a, b in zip(x, y, strict=True))
    assert gap < 1e-4, gap


def test_nonfinite_loss_skips_the_update_on_every_rank(ray_cluster, model_dir):
    """TP=2: each rank holds other shards, so both must skip together; the weights stay exactly as they were."""
    samples = make_samples(4, seed=5)
    with trainer(model_dir("llama"), tp=2, lr=3e-3) as tr:
        before = tr.logprobs(samples)
        stats = tr.train_step(samples, "tests.plugins:nan_loss")
        assert stats["skipped_nonfinite"] == 1.0 and stats["update_ok"] == 0.0, stats
        assert tr.logprobs(samples) == before
        stats = tr.train_step(samples, "sft")  # the next finite batch trains as usual
        assert stats["skipped_nonfinite"] == 0.0 and tr.logprobs(samples) != before, stats


def test_save_load_reproduces_next_step(ray_cluster, model_dir, tmp_path):
    samples = make_samples(4, seed=5)
    for s in samples:
        s.advantage = 1.0
    with trainer(model_dir("qwen2"), lr=1e-3, warmup_steps=2) as tr:
        tr.train_step(samples, "policy")
        tr.save(str(tmp_path / "ckpt"))
        expected = tr.train_step(samples, "policy")
        expected_lp = tr.logprobs(samples)
    with trainer(model_dir("qwen2"), lr=1e-3, warmup_steps=2) as tr:
        tr.load(str(tmp_path / "ckpt"))
        got = tr.train_step(samples, "policy")
        got_lp = tr.logprobs(samples)
    assert got == expected
    assert got_lp == expected_lp


def test_export_serves_in_vllm_and_logprobs_match_engine(ray_cluster, model_dir, tmp_path):
    samples = make_samples(4, seed=6)
    for s in samples:
        s.advantage = 1.0
    with trainer(model_dir("qwen2"), lr=1e-2) as tr:
        tr.train_step(samples, "policy")
        out = tr.save_hf(str(tmp_path / "hf"))
        reloaded = hf(out).state_dict()
        exported = {k: v for bucket in tr.weights() for k, v in bucket}
        assert all(torch.equal(reloaded[k], exported[k]) for k in exported)
        group = start_engines(out, tmp_path / "logs")
        try:
            prompt = samples[0].prompt_ids
            (cs,) = asyncio.run(group.engines[0].generate([prompt], SamplingParams(n=4, max_tokens=16, seed=3)))
        finally:
            group.stop()
        from vime.types import Sample

        engine_samples = [Sample.from_completion(prompt, c) for c in cs]
        trainer_lps = tr.logprobs(engine_samples)
    worst = max(abs(a - b) for s, t in zip(engine_samples, trainer_lps) for a, b in zip(s.logprobs, t))
    assert worst < 1e-3
    # and the trained weights differ from the original model
    orig = hf(model_dir("qwen2"))
    assert max(abs(a - b) for a, b in zip(hf_response_logprobs(orig, engine_samples[0]), trainer_lps[0])) > 1e-3


@pytest.mark.parametrize(
    "dtype, temperature, bonus",
    [
        (torch.float32, 1.0, False),
        (torch.float32, 0.7, False),
        (torch.bfloat16, 1.0, False),
        (torch.float32, 0.7, True),
    ],
)
def test_fused_logprobs_equal_log_softmax_in_value_entropy_and_gradient(dtype, temperature, bonus):
    """The in-place autograd function against plain `log_softmax` (TP=1, in this process): a wrong backward
    (the fused `onehot - softmax`, the entropy bonus's -p(log p + H)) or a missing temperature factor shows in the
    gradient."""
    from logprob_oracle import both, one_rank

    from trainers.megatron.logprobs import logprobs_and_entropy

    with one_rank():
        g = torch.Generator().manual_seed(0)
        base = (torch.randn(2, 16, 300, generator=g) * 3).to(dtype)
        targets = torch.randint(0, 300, (2, 16), generator=g)
        ent_w = torch.randn(2, 16, generator=g) if bonus else None
        got, ref = both(base, targets, torch.randn(2, 16, generator=g), temperature, ent_w)
        assert torch.allclose(got["logp"], ref["logp"], atol=1e-5)
        assert torch.allclose(got["entropy"], ref["entropy"], atol=1e-4)
        assert torch.allclose(got["grad"].float(), ref["grad"].float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
        with torch.no_grad():  # forward-only, in the [s, b, V] layout LogProbHead gets from Megatron
            lp_sb, none = logprobs_and_entropy(base.transpose(0, 1).contiguous(), targets.t(), temperature, False)
        assert none is None and torch.allclose(lp_sb.t(), ref["logp"], atol=1e-5)
