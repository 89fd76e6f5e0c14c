"""Contract tests: the real implementations (vLLM-CPU engine group, Megatron trainer, gloo weight channel, the
registered specs) driven through exactly the members `vime/protocols.py` declares.

Each implementation is wrapped in `Only`, which refuses any attribute the protocol does not declare and records
the ones used; every test ends by checking it used all of them. So a member orchestration needs but the protocol
lacks fails here (as it does in mypy), and a declared member nobody implements or exercises fails too.
"""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ENGINE_ARGS, hf_response_logprobs
from safetensors.torch import load_file

from vime import protocols
from vime.engine import EngineConfig
from vime.registry import ENGINES, TRAINERS, load_object
from vime.secret import auth_headers
from vime.trainer import TrainerConfig
from vime.types import Sample, SamplingParams
from vime.weights import WeightPushError, WeightsConfig

pytestmark = pytest.mark.slow

PROMPT = [1, 60, 61, 62, 63, 64, 65]


def declared(proto: type) -> set[str]:
    """The members a protocol declares (methods, properties, annotated attributes), with those of the protocols
    it extends, without dunders."""
    names: set[str] = set()
    for cls in proto.__mro__:
        if cls.__dict__.get("_is_protocol") and cls.__name__ != "Protocol":
            names |= {n for n in vars(cls) if not n.startswith("_")}
            names |= {n for n in getattr(cls, "__annotations__", {}) if not n.startswith("_")}
    return names


class Only:
    """A view of `impl` restricted to `proto`'s declared members; records which were touched."""

    def __init__(self, impl: Any, proto: type):
        object.__setattr__(self, "_impl", impl)
        object.__setattr__(self, "_proto", proto)
        object.__setattr__(self, "used", set())

    def __getattr__(self, name: str) -> Any:
        if name not in declared(self._proto):
            raise AssertionError(f"{name!r} is used but not declared by {self._proto.__name__}")
        self.used.add(name)
        return getattr(self._impl, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._impl(*args, **kwargs)

    def assert_all_used(self) -> None:
        missing = declared(self._proto) - self.used
        assert not missing, f"{self._proto.__name__} declares {sorted(missing)} but the contract test never used them"


def generate(engine: Only, seed: int = 1) -> list[Any]:
    (cs,) = asyncio.run(engine.generate([PROMPT], SamplingParams(n=2, max_tokens=6, seed=seed)))
    return cs


def buckets(model_path: Path) -> list[list[tuple[str, Any]]]:
    items = sorted(load_file(str(model_path / "model.safetensors")).items())
    return [items[i : i + 5] for i in range(0, len(items), 5)]


@pytest.fixture(scope="module")
def group(model_dir, tmp_path_factory):
    """A group of its own: this test restarts and stops it, which the shared session group must not see."""
    spec = ENGINES.get("vllm")
    cfg = EngineConfig(args=dict(ENGINE_ARGS), startup_timeout_s=240)
    g = spec.make_group(
        cfg,
        model_path=str(model_dir("qwen2")),
        log_dir=str(tmp_path_factory.mktemp("contract")),
        weights_backend="gloo",
    )
    g.start()
    yield Only(g, protocols.EngineGroup)
    g.stop()


def test_engine_group_and_engine_contract(group, model_dir):
    assert group.start() is group._impl  # returns the started group (Only is a view of it)
    engines = group.engines
    assert len(engines) == 1 and isinstance(engines[0], protocols.Engine)
    engine = Only(group.pick("session-a"), protocols.Engine)
    assert group.pick("session-a") is engine._impl  # a session always lands on the same engine
    assert engine.base_url.startswith("http://127.0.0.1:")
    assert asyncio.run(engine.healthy())
    before = group.step_metrics()
    cs = generate(engine)
    assert len(cs) == 2 and all(len(c.logprobs) == len(c.token_ids) > 0 for c in cs)
    after = group.step_metrics()
    assert after["engines/servers"] == 1.0
    assert after["ttft/count"] - before.get("ttft/count", 0.0) >= 1, f"TTFT counter did not move: {after}"
    (url,) = group.urls()
    assert group.dead() == []
    assert url == engine.base_url  # no router: the engine is the server

    # weights go where urls() says, and the version reaches every token
    channel = Only(
        load_object(ENGINES.get("vllm").weight_channel)({"backend": "gloo", "timeout_s": 60}, [url]),
        protocols.WeightChannel,
    )
    try:
        channel.connect()
        stats = channel.push(buckets(model_dir("qwen2")), "contract-v1")
    finally:
        channel.close()
    channel.assert_all_used()
    assert stats["bytes"] > 0
    group.note_weight_version("contract-v1")  # engines that cannot report a version tag tokens with this one
    assert all(c.weight_versions == ["contract-v1"] * len(c.token_ids) for c in generate(engine))

    async def streamed() -> list[Any]:
        return [c async for c in engine.stream(PROMPT, SamplingParams(max_tokens=6, seed=3))]

    grown = asyncio.run(streamed())
    ((whole,),) = asyncio.run(engine.generate([PROMPT], SamplingParams(max_tokens=6, seed=3)))
    sizes = [len(c.token_ids) for c in grown]
    assert sizes == sorted(set(sizes)), grown  # it grows as sampled (how many pieces depends on load: vLLM merges)
    assert [c.finish_reason for c in grown] == [""] * (len(grown) - 1) + [whole.finish_reason], grown
    last = grown[-1]
    assert (last.token_ids, last.logprobs) == (whole.token_ids, whole.logprobs), (last, whole)
    assert last.weight_versions == ["contract-v1"] * len(last.token_ids)

    group.sleep(level=1)  # on CPU vLLM pauses scheduling but frees nothing
    assert httpx.get(url + "/is_sleeping", timeout=10, headers=auth_headers()).json()["is_sleeping"] is True
    group.wake_up(None)
    assert httpx.get(url + "/is_sleeping", timeout=10, headers=auth_headers()).json()["is_sleeping"] is False
    assert len(generate(engine)) == 2

    group.restart(0)  # same URL, model-directory weights, so the pushed version is gone
    assert group.urls() == [url] and group.dead() == []
    engine.assert_all_used()
    fresh = group.pick()
    assert fresh is not engine._impl and asyncio.run(fresh.healthy())
    assert all("contract-v1" not in c.weight_versions for c in generate(Only(fresh, protocols.Engine)))


def test_trainer_contract(model_dir, ray_cluster, group, tmp_path):
    """The Megatron trainer through the declared members only, pushing into this module's engines (the shared
    ones must keep the model directory's version for the tests that check it)."""
    model = model_dir("qwen2")
    trainer = Only(
        TRAINERS.get("megatron").make(
            TrainerConfig(micro_batch_size=4, lr=1e-2), model_path=str(model), placement=None
        ),
        protocols.Trainer,
    )
    try:
        samples = [
            Sample(prompt_ids=PROMPT, response_ids=[70 + i, 71, 72], logprobs=[0.0] * 3, advantage=1.0 - i)
            for i in range(2)
        ]
        lp = trainer.logprobs(samples, 1.0)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model, attn_implementation="eager")
        worst = max(abs(a - b) for s, row in zip(samples, lp) for a, b in zip(row, hf_response_logprobs(hf, s)))
        assert worst < 1e-3, f"trainer vs transformers log-probs differ by {worst}"

        trainer.save(str(tmp_path / "ckpt"))
        trainer.set_lr(1e-2)
        trainer.reset_optimizer()  # a fresh optimiser over the same parameters: the next step still moves them
        stats = trainer.train_step(
            samples, "policy", {"clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.0}, old_logprobs=lp, temperature=1.0
        )
        assert stats["loss"] == stats["loss"] and trainer.logprobs(samples, 1.0) != lp  # the step changed weights
        trainer.load(str(tmp_path / "ckpt"))
        restored = trainer.logprobs(samples, 1.0)
        assert max(abs(a - b) for r0, r1 in zip(lp, restored) for a, b in zip(r0, r1)) < 1e-6

        trainer.release_memory()  # nothing cached on CPU; must not fail
        spec = ENGINES.get("vllm")
        with pytest.raises(WeightPushError, match="127.0.0.1:9"):  # raised in rank 0, arrives as itself
            trainer.connect_weights(
                spec.weight_channel, WeightsConfig(backend="disk", timeout_s=5).model_dump(), ["http://127.0.0.1:9"]
            )
        trainer.connect_weights(spec.weight_channel, WeightsConfig(bucket_mb=1).model_dump(), group._impl.urls())
        assert trainer.push_weights("contract-t1")["bytes"] > 0
        for e in group._impl.engines:
            (c, _) = asyncio.run(e.generate([PROMPT], SamplingParams(n=2, max_tokens=4, seed=2)))[0]
            assert c.weight_versions == ["contract-t1"] * len(c.token_ids)
        out = Path(trainer.save_hf(str(tmp_path / "hf")))
        assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    finally:
        trainer.shutdown()
    trainer.assert_all_used()


def test_specs_contract(qwen2_engines, tmp_path):
    """The registered specs: schema, rules across sections, the context limit, attach, the trainer's args."""
    spec = Only(ENGINES.get("vllm"), protocols.EngineSpec)
    assert spec.name == "vllm"
    cfg = spec.config.model_validate({"args": {"max_model_len": 256}})
    assert issubclass(spec.config, EngineConfig) and spec.context_limit(cfg) == 256
    assert spec.context_limit(spec.config()) is None
    assert set(spec.weight_backends) >= {"gloo", "disk"}
    assert spec.validate(cfg, WeightsConfig(backend="gloo"), False) == []
    assert "placement.colocate" in spec.validate(cfg, WeightsConfig(backend="ipc"), False)[0]
    made = spec.make_group(cfg, model_path="m", log_dir=str(tmp_path))
    assert isinstance(made, protocols.EngineGroup) and made.urls() == []  # built, not started
    attached = spec.attach(qwen2_engines.urls())
    assert [e.base_url for e in attached.engines] == qwen2_engines.urls()
    attached.stop()  # leaves servers it did not start running
    assert all(asyncio.run(e.healthy()) for e in qwen2_engines.engines)
    assert isinstance(spec.weight_channel, str)
    spec.assert_all_used()

    tspec = Only(TRAINERS.get("megatron"), protocols.TrainerSpec)
    assert tspec.name == "megatron" and tspec.check_args({}) == []
    assert tspec.check_args({"num_layers": 2, "adam_eps": 1e-8}) == []  # TransformerConfig / OptimizerConfig
    (err,) = tspec.check_args({"num_layerz": 2})
    assert "trainer.args.num_layerz" in err and "TransformerConfig" in err
    assert callable(tspec.make) and inspect.signature(tspec.make).parameters.keys() >= {"cfg", "model_path"}
    assert inspect.signature(tspec.make_critic).parameters.keys() >= {"cfg", "model_path", "placement"}
    tspec.assert_all_used()


def test_critic_contract_value_loss_falls_on_fixed_returns(model_dir, ray_cluster, tmp_path):
    """PPO's critic through the declared members only: its values start at 0 (zero head), the clipped value loss
    falls while it learns fixed returns, and a checkpoint restores its values exactly."""
    from vime.trainer import CriticConfig

    critic = Only(
        TRAINERS.get("megatron").make_critic(
            CriticConfig(micro_batch_size=2, lr=1e-2), model_path=str(model_dir("qwen2")), placement=None
        ),
        protocols.Critic,
    )
    try:
        samples = [Sample(prompt_ids=PROMPT, response_ids=[70 + i, 71, 72], logprobs=[0.0] * 3) for i in range(4)]
        returns = [[1.0, 1.0, 1.0] if i % 2 else [-0.5, -0.5, -0.5] for i in range(4)]
        v0 = critic.values(samples)
        assert v0 == [[0.0] * 3] * 4, v0
        losses, old = [], v0
        for _ in range(8):
            stats = critic.train_step(samples, returns, old, {"value_clip": 0.5})
            losses.append(stats["loss"])
            old = critic.values(samples)
        assert losses[-1] < 0.5 * losses[0] and "value_clip_frac" in stats, losses
        critic.save(str(tmp_path / "critic"))
        critic.train_step(samples, returns, old, {"value_clip": None})
        assert critic.values(samples) != old
        critic.load(str(tmp_path / "critic"))
        assert critic.values(samples) == old
    finally:
        critic.shutdown()
    critic.assert_all_used()


def test_engine_group_stops(group):
    url = group.urls()[0]
    group.stop()
    group.stop()  # idempotent
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=5)
    group.assert_all_used()
