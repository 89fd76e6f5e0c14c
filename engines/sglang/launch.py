"""`python -m engines.sglang.launch <SGLang flags>`: SGLang's own HTTP server, keyed with the run's secret.

SGLang guards its routes itself (`api_key` for generation, `admin_api_key` for the weight, memory and pause
routes; /health and /metrics stay open). Given as flags, the keys would show in `ps` to every local user, so this
launcher reads the secret from the environment (`vime.secret`) and adds both to the flags it parses in-process:
nothing reaches a server vime started without the run's secret.
"""

from __future__ import annotations

import os
import sys

from vime.secret import ENV


def main(argv: list[str]) -> None:
    from sglang.srt.entrypoints.http_server import launch_server
    from sglang.srt.server_args import prepare_server_args

    secret = os.environ.get(ENV)
    if not secret:  # never serve unguarded by accident: the group always sets it
        raise SystemExit(f"{ENV} is not set in the SGLang server's environment; its API keys need it")
    # parsed here, in-process: the keys never reach the process's command line
    launch_server(prepare_server_args([*argv, *key_flags(secret)]))


def key_flags(secret: str) -> list[str]:
    """`--flag=value`, never `--flag value`: a url-safe secret starts with "-" one time in 32, and argparse then
    takes it for a flag ("argument --api-key: expected one argument", seen on an H100)."""
    return [f"--api-key={secret}", f"--admin-api-key={secret}"]


if __name__ == "__main__":
    main(sys.argv[1:])
