"""``python -m sandboxd.envd [--port 49983] [--host 0.0.0.0]``: run envd in the foreground.

Unknown flags are logged and ignored: the template's init may be newer or older than this envd, and
a sandbox must never fail to start over a flag. Logs go to stderr, which is the sandbox console.

envd's start is most of a cold sandbox create: this module imports only what serving needs
(:mod:`sandboxd.envd.lean`; no argparse for three flags) and serves HTTP with its own small
server (:mod:`sandboxd.envd.server`), not uvicorn.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from .contract import ENVD_PORT
from .lean import skip_unused_imports

KEEP_ALIVE_S = 330  # above the SDK's 300 s idle pool expiry, so the server never closes first (1.4)


@dataclass
class Args:
    port: int
    host: str
    log_level: str


def parse_args(argv: list[str]) -> Args:
    """``--port N``, ``--host H``, ``--log-level L`` (also ``--flag=value``); defaults from the
    environment; anything else is reported and ignored, and so is a port that is not a number."""
    values = {"--port": os.environ.get("ENVD_PORT", str(ENVD_PORT)),
              "--host": os.environ.get("ENVD_HOST", "0.0.0.0"),
              "--log-level": os.environ.get("ENVD_LOG_LEVEL", "info")}
    unknown: list[str] = []
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in values and (eq or i + 1 < len(argv)):
            if not eq:
                i += 1
                value = argv[i]
            values[flag] = value
        else:
            unknown.append(argv[i])
        i += 1
    try:
        port = int(values["--port"])
    except ValueError:
        unknown.append(f"--port={values['--port']}")
        port = ENVD_PORT
    if unknown:
        print(f"envd: ignoring unknown arguments {unknown}", file=sys.stderr)
    return Args(port=port, host=values["--host"], log_level=values["--log-level"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s envd %(levelname)s %(name)s: %(message)s")

    skip_unused_imports()
    from .app import EnvdApp
    from .server import run

    run(EnvdApp(), args.host, args.port, keep_alive_s=KEEP_ALIVE_S, graceful_s=2)


if __name__ == "__main__":
    main()
