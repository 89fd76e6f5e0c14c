"""Name → implementation, for every pluggable part: one helper, one error shape.

A recipe names a part either by a registered name (`reward: math`) or by an import path to the user's own code
(`reward: mypkg.rewards:score`). Entries are stored as import-path *strings* or as objects: engines and trainers
are strings, so `vime/` never imports them — choosing `engine.name: vllm` in a recipe is what pulls the engine in.
Every failure says what was asked for, what exists, and what to write instead.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")

DEFAULT_ENGINE = "vllm"  # the engine a recipe gets when it names none


class PluginError(ValueError):
    """A name or plug-in path that cannot be used; the message names what to fix."""


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


def check_arity(fn: Any, n_args: int, *, what: str) -> Callable[..., Any]:
    """`fn` must be callable with `n_args` positional arguments (checked now, not at the first sample)."""
    if not callable(fn):
        raise PluginError(f"{what}: {type(fn).__name__} is not callable")
    try:
        inspect.signature(fn).bind(*([None] * n_args))
    except TypeError as e:
        raise PluginError(f"{what}: must accept {n_args} positional argument(s): {e}") from e
    except ValueError:  # builtins without a signature: trust them
        pass
    return cast(Callable[..., Any], fn)


def load_callable(path: str, n_args: int, *, what: str = "plug-in") -> Callable[..., Any]:
    """Load a function by import path and check it can be called with `n_args` positional arguments."""
    return check_arity(load_object(path, what=what), n_args, what=f"{what} {path!r}")


class Registry(Generic[T]):
    """Built-ins by name plus `pkg.module:attr` for anything else.

    `kind` names the part in errors ("reward"), `key` the recipe key that chose it ("rollout.reward"), and
    `n_args`, when set, is the positional arity every entry must accept.
    """

    def __init__(self, kind: str, key: str, entries: Mapping[str, T | str], *, n_args: int | None = None):
        self.kind, self.key, self.n_args = kind, key, n_args
        self._entries: dict[str, T | str] = dict(entries)

    def register(self, name: str, entry: T | str) -> None:
        self._entries[name] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        what = f"{self.kind} {name!r} ({self.key})"
        if name in self._entries:
            entry = self._entries[name]
            obj: Any = load_object(entry, what=what) if isinstance(entry, str) else entry
        elif ":" in name:
            obj = load_object(name, what=what)
        else:
            raise PluginError(
                f"unknown {self.kind} {name!r} ({self.key}); registered: {self.names()}; "
                "for your own, write 'package.module:name'"
            )
        if self.n_args is not None:
            check_arity(obj, self.n_args, what=what)
        return cast(T, obj)


# Engines and trainers: the name maps to the module-level spec object of the implementation's package.
ENGINES: Registry[Any] = Registry(
    "engine",
    "engine.name",
    {DEFAULT_ENGINE: "engines.vllm.engine_spec:SPEC", "sglang": "engines.sglang.engine_spec:SPEC"},
)
TRAINERS: Registry[Any] = Registry("trainer", "trainer.name", {"megatron": "trainers.megatron.trainer_spec:SPEC"})
