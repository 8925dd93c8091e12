"""envd's mutable configuration, set by ``POST /init`` from the orchestrator.

One object shared by the HTTP handlers and the RPC services, so a later ``/init`` (for example after
a snapshot resume) takes effect for every new request without restarting anything.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

log = logging.getLogger("envd")

FALLBACK_USER = "root"
CLOCK_SYNC_THRESHOLD_S = 1.0


@dataclass
class EnvdState:
    """What /init configured: env vars for processes, the access token, default user and cwd."""

    env_vars: dict[str, str] = field(default_factory=dict)
    access_token: str | None = None
    default_user: str = FALLBACK_USER
    default_workdir: str | None = None

    def apply_init(self, body: dict[str, Any]) -> None:
        """Merge an ``/init`` JSON body (all keys optional, unknown keys ignored)."""
        env_vars = body.get("envVars")
        if isinstance(env_vars, dict):
            self.env_vars.update({str(k): str(v) for k, v in env_vars.items()})
        token = body.get("accessToken")
        if isinstance(token, str) and token:
            self.access_token = token
        user = body.get("defaultUser")
        if isinstance(user, str) and user:
            self.default_user = user
        workdir = body.get("defaultWorkdir")
        if isinstance(workdir, str) and workdir:
            self.default_workdir = workdir
        ts = body.get("timestamp")
        if isinstance(ts, str) and ts:
            sync_clock(ts)


def sync_clock(rfc3339: str) -> None:
    """Step the clock to the host's time when it drifted (after a snapshot resume); best effort.

    gVisor refuses clock_settime; that is fine, its clock follows the host anyway.
    """
    try:
        host = datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        log.warning("init: bad timestamp %r", rfc3339)
        return
    if abs(host - time.time()) < CLOCK_SYNC_THRESHOLD_S:
        return
    try:
        time.clock_settime(time.CLOCK_REALTIME, host)
        log.info("init: clock set to host time %s", rfc3339)
    except OSError as e:
        log.info("init: could not set clock (%s)", e)
