"""`vime <command>`: make-model, make-data, rollout, train, serve. Recipes are YAML (`-c`), overridden by
`--set key.path=value`; engine flags pass through verbatim as `--<engine>-<flag> [value]` (the engine's
registered name: `--vllm-max-num-seqs 64`)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

import yaml

from vime.models import ARCHS
from vime.registry import ENGINES

if TYPE_CHECKING:  # the CLI imports the config (pydantic, torch-free but not tiny) only for commands that need it
    from vime.config import Config


def split_engine_flags(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Pull `--<engine>-max-num-seqs 64` / `--<engine>-enforce-eager` out of argv into engine args (verbatim
    names), for every registered engine name (`engine_flag_owners` says whose they were)."""
    prefixes = tuple(f"--{name}-" for name in ENGINES.names())
    rest: list[str] = []
    flags: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        prefix = next((p for p in prefixes if a.startswith(p)), None)
        if prefix is not None:
            name, eq, val = a[len(prefix) :].partition("=")
            if eq:
                flags[name] = yaml.safe_load(val)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                flags[name] = yaml.safe_load(argv[i + 1])
                i += 1
            else:
                flags[name] = True
        else:
            rest.append(a)
        i += 1
    return rest, flags


def engine_flag_owners(argv: list[str]) -> set[str]:
    """The engines whose `--<engine>-` flags appear in argv (flags for an engine the recipe does not run are an
    error, not silently passed to another engine)."""
    return {n for n in ENGINES.names() for a in argv if a.startswith(f"--{n}-")}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vime", description="RL post-training: rollout, train, serve.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model", help="write a tiny random HF model + tokenizer")
    m.add_argument("--arch", default="qwen2", choices=list(ARCHS))
    m.add_argument("--size", default="tiny")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    m.add_argument("--device", default="cpu", help="where to initialise (cuda: fast for the 0.5b/1.5b/7b sizes)")
    d = sub.add_parser("make-data", help="write the toy arithmetic task as train/eval JSONL")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    for name, hlp in (
        ("rollout", "sample groups into the buffer and write them as JSONL"),
        ("train", "run the recipe's training job"),
        ("serve", "engines + the OpenAI gateway alone, for agent development"),
    ):
        c = sub.add_parser(name, help=hlp)
        c.add_argument("-c", "--config", required=True, help="YAML recipe")
        c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
        c.add_argument("--steps", type=int, default=None)
        c.add_argument("--out", default=None, help="samples JSONL (rollout)")
        if name == "train":
            c.add_argument("--resume", default=None, help="checkpoint directory (or checkpoints root) to resume")
    return p


_terminated = threading.Event()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _terminated.set()
    if _in_finalizer(frame):
        # an exception raised in a finalizer is printed and dropped: an asyncio loop's `__del__` once took the
        # SIGTERM this way and the run trained on. Deliver it again once the finalizer is over.
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    sys.exit(143)


def _in_finalizer(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _sigterm_to_exit() -> None:
    # A SIGTERM must unwind through the context managers that own engine processes, like Ctrl-C does.
    signal.signal(signal.SIGTERM, _on_sigterm)
    # `kill -USR1 <pid>` prints every thread's stack to stderr: what a run that seems stuck is waiting for.
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def main(argv: list[str] | None = None) -> int:
    if os.getcwd() not in sys.path:  # plug-ins like `examples.x:fn` resolve from where vime is run, as with -m
        sys.path.insert(0, os.getcwd())
    argv = list(sys.argv[1:] if argv is None else argv)
    owners = engine_flag_owners(argv)
    argv, engine_flags = split_engine_flags(argv)
    args = _parser().parse_args(argv)
    if args.cmd == "make-model":
        from vime.models import make_model

        print(make_model(args.arch, args.size, args.out, seed=args.seed, dtype=args.dtype, device=args.device))
        return 0
    if args.cmd == "make-data":
        from vime.rewards.arithmetic import write_dataset

        print(*write_dataset(args.out, seed=args.seed))
        return 0

    from vime.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set, engine_flags)
    except ConfigError as e:
        print(f"vime: {e}", file=sys.stderr)
        return 2
    if owners - {cfg.engine.name}:
        print(
            f"vime: flags --{'-/--'.join(sorted(owners))}-* are for another engine than the recipe's "
            f"engine.name={cfg.engine.name!r}",
            file=sys.stderr,
        )
        return 2
    _sigterm_to_exit()
    try:
        return _run(cfg, args)
    except SystemExit:
        if _terminated.is_set():  # Ray's ray.get turns the handler's exit into SystemExit(1): a SIGTERM still exits 143
            raise SystemExit(143) from None
        raise


def _run(cfg: Config, args: argparse.Namespace) -> int:
    if args.cmd == "train":
        return _train(cfg, args)
    if args.cmd == "serve":
        return _serve(cfg)
    from vime.run_rollout import run_rollout

    out = args.out or f"{cfg.run.out_dir}/samples.jsonl"
    summary = run_rollout(cfg, steps=args.steps or 2, out=out)
    _print_samples(out)
    print(
        f"throughput: {summary['tokens_per_s']:.1f} response tokens/s, {summary['samples_per_s']:.1f} samples/s "
        f"over {summary['samples']} samples in {summary['seconds']:.1f}s; mean reward {summary['mean_reward']:.3f}"
    )
    print(json.dumps(summary))
    return 0


def _train(cfg: Config, args: argparse.Namespace) -> int:
    if cfg.loop.mode == "async":
        from vime.loop_async import train
    else:
        from vime.loop import train

    if args.steps is not None:
        cfg.loop.num_steps = args.steps
    result = train(cfg, resume=args.resume)
    print("\nlast step's samples:\n  " + "\n  ".join(result["samples"]))
    print(result["summary"])
    print(
        f"plot: {result['plot']}\nmetrics: {cfg.run.out_dir}/metrics.jsonl, tensorboard: {cfg.run.out_dir}/tensorboard"
    )
    return 0


def _serve(cfg: Config) -> int:
    import time
    from pathlib import Path

    from vime.config import gateway_config
    from vime.gateway.server import Gateway
    from vime.rollout.context import load_tokenizer
    from vime.specs import make_engine_group
    from vime.supervise import SupervisedPool

    engines = make_engine_group(cfg.engine, cfg.model.path, str(Path(cfg.run.out_dir) / "logs"))
    # a server that dies or hangs is restarted (with the model directory's weights) and its requests re-issued
    pool = SupervisedPool(engines, lambda: None, cfg.loop.max_engine_restarts, probe=cfg.loop.engine_probe)
    try:
        engines.start()
        with Gateway(pool, load_tokenizer(cfg.model.tokenizer or cfg.model.path), gateway_config(cfg)) as gw:
            print(
                f"OpenAI endpoint: {gw.base_url}\nAPI key: {gw.api_key}\nmodel: {gw.cfg.model_name}\n"
                "sessions: send header x-session-id, or use base_url .../sessions/<id>/v1. Ctrl-C stops.",
                flush=True,
            )
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        engines.stop()
    return 0


def _print_samples(path: str, k: int = 3) -> None:
    from vime.types import read_jsonl

    for i, s in enumerate(read_jsonl(path)):
        if i >= k:
            break
        print(
            f"sample {i}: prompt={s.prompt!r} response={s.response!r} reward={s.reward} "
            f"tokens={len(s.response_ids)} mean_logprob={sum(s.logprobs) / max(1, len(s.logprobs)):.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
