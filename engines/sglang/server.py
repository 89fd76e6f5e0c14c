"""One SGLang server as a child process (`engines.common.process.ServerProcess`: start, wait for health, stop
with no orphan left behind); this file says only how SGLang is launched: through `engines.sglang.launch`, which
is SGLang's own launcher keyed with the run's secret."""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any

from engines.common.process import ServerProcess, to_cli_flags


def sglang_version() -> str | None:
    """The installed SGLang (None: not in this environment; a fake stands in on CPU), without importing it."""
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


class SGLangServer(ServerProcess):
    label = "SGLang"

    def __init__(self, model_path: str, **kwargs: Any):
        super().__init__(model_path, **kwargs)
        self.version = sglang_version()

    def command(self) -> list[str]:
        # SGLang's switches are store_true flags with no --no-<flag> form: false means leave it out
        args = {k: v for k, v in self.args.items() if v is not False}
        return [
            sys.executable,
            "-m",
            "engines.sglang.launch",
            "--model-path",
            self.model_path,
            "--host",
            self.host,
            "--port",
            str(self.port),
            *to_cli_flags(args),
        ]
