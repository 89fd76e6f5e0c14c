"""Name → implementation, and `pkg.module:attr` plug-ins.

Engines and trainers are registered as import-path *strings*, so `vime/` never imports them: choosing
`engine.name: vllm` in a recipe is what pulls vLLM in, not importing vime.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

ENGINES: dict[str, str] = {
    "vllm": "engines.vllm.group:VLLMEngineGroup",
}
TRAINERS: dict[str, str] = {
    "megatron": "trainers.megatron.trainer:MegatronTrainer",
}


class PluginError(ValueError):
    """A plug-in path or signature that cannot be used; the message names what to fix."""


def load_object(path: str, *, what: str = "plug-in") -> Any:
    """Import `pkg.module:attr` (attr may be dotted). Errors name the path and what was wrong with it."""
    if not isinstance(path, str) or ":" not in path:
        raise PluginError(f"{what} {path!r}: expected an import path of the form 'package.module:name'")
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(f"{what} {path!r}: cannot import module {module_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_callable(path: str, n_args: int, *, what: str = "plug-in") -> Callable[..., Any]:
    """Load a function and check it can be called with `n_args` positional arguments."""
    fn = load_object(path, what=what)
    if not callable(fn):
        raise PluginError(f"{what} {path!r}: {type(fn).__name__} is not callable")
    try:
        inspect.signature(fn).bind(*([None] * n_args))
    except TypeError as e:
        raise PluginError(f"{what} {path!r}: must accept {n_args} positional argument(s): {e}") from e
    except ValueError:  # builtins without a signature: trust them
        pass
    return fn


def resolve(table: dict[str, str], name: str, *, kind: str) -> Any:
    """A registered name, or an import path for a user's own implementation."""
    if name in table:
        return load_object(table[name], what=f"{kind} {name!r}")
    if ":" in name:
        return load_object(name, what=kind)
    raise PluginError(f"unknown {kind} {name!r}; choose one of {sorted(table)} or give 'package.module:Class'")
