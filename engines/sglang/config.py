"""The `engine:` section when `engine.name: sglang`: the shared fields only. SGLang's own flags are not modelled:
`args` goes to SGLang's launcher verbatim (`mem_fraction_static: 0.3` → `--mem-fraction-static 0.3`)."""

from __future__ import annotations

from vime.engine import EngineConfig


class SGLangEngineConfig(EngineConfig):
    """Aggregated servers only: SGLang's own P/D (its router and its KV transfer) is not wired up yet, so a
    recipe asking for `topology` fails here, naming the key."""
