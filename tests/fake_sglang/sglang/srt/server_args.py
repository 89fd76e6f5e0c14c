"""FAKE SGLang (tests only, see tests/fake_sglang/README.md): the flags the fake understands; any other flag is
refused, as SGLang's parser refuses unknown ones."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class ServerArgs:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    weight_version: str = "default"
    enable_deterministic_inference: bool = False
    enable_memory_saver: bool = False
    disable_radix_cache: bool = False
    enable_return_routed_experts: bool = False
    random_seed: int = 0
    context_length: int = 2048
    dtype: str = "float32"
    api_key: str | None = None
    admin_api_key: str | None = None


def prepare_server_args(argv: list[str]) -> ServerArgs:
    p = argparse.ArgumentParser("fake sglang")
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--weight-version", default="default")
    p.add_argument("--enable-deterministic-inference", action="store_true")
    p.add_argument("--enable-memory-saver", action="store_true")
    p.add_argument("--disable-radix-cache", action="store_true")
    p.add_argument("--enable-return-routed-experts", action="store_true")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--context-length", type=int, default=2048)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--api-key")
    p.add_argument("--admin-api-key")
    return ServerArgs(**vars(p.parse_args(argv)))
