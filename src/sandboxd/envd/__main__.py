"""``python -m sandboxd.envd [--port 49983] [--host 0.0.0.0]``: run envd in the foreground.

Unknown flags are logged and ignored: the template's init may be newer or older than this envd, and
a sandbox must never fail to start over a flag. Logs go to stderr, which is the sandbox console.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import uvicorn

from .contract import ENVD_PORT

KEEP_ALIVE_S = 330  # above the SDK's 300 s idle pool expiry, so the server never closes first (1.4)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="envd", description="sandboxd envd daemon")
    parser.add_argument("--port", type=int, default=int(os.environ.get("ENVD_PORT", ENVD_PORT)))
    parser.add_argument("--host", default=os.environ.get("ENVD_HOST", "0.0.0.0"))
    parser.add_argument("--log-level", default=os.environ.get("ENVD_LOG_LEVEL", "info"))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"envd: ignoring unknown arguments {unknown}", file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s envd %(levelname)s %(name)s: %(message)s")

    from .app import EnvdApp

    config = uvicorn.Config(
        EnvdApp(),
        host=args.host,
        port=args.port,
        http="h11",
        ws="none",
        loop="asyncio",
        lifespan="on",
        interface="asgi3",
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=2,
        access_log=False,
        log_config=None,
        log_level=level,
        server_header=False,
    )
    EnvdServer(config).run()


class EnvdServer(uvicorn.Server):
    """uvicorn's Server, waking once a second instead of ten times: an idle envd's wake-ups are
    host CPU (gVisor intercepts each), and they decide how many idle sandboxes a host holds.
    Its ticks only refresh the Date header (one-second resolution) and notice an exit request
    (a signal: envd then exits within a second)."""

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter += 10  # on_tick refreshes the Date header when counter % 10 == 0
            await asyncio.sleep(1.0)


if __name__ == "__main__":
    main()
