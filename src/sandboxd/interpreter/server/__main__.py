"""``python3 -m server``: serve the code interpreter on 0.0.0.0:49999 (the SDKs' JUPYTER_PORT).

Its log lines go to stdout: the template's start command, whose output sandboxd keeps in the
sandbox's log (``GET /v2/sandboxes/{id}/logs``)."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from .app import make_app

PORT = int(os.environ.get("SANDBOXD_INTERPRETER_PORT", "49999"))

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(make_app(), host="0.0.0.0", port=PORT, log_level="warning", access_log=False,
                timeout_keep_alive=330)
