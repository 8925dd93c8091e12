"""The orchestrator's side of envd: wait until it answers, then hand it its configuration.

A sandbox is handed to a client only after this succeeded (the SDK sends its first RPC right after
create, with no readiness probe of its own).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import httpx

from sandboxd.templates.envd_bundle import ENVD_PORT

DEFAULT_USER = "user"
DEFAULT_WORKDIR = "/home/user"


class EnvdNotReady(RuntimeError):
    """envd did not answer /health (or refused /init) before the deadline."""


def envd_url(address: str, port: int = ENVD_PORT) -> str:
    return f"http://{address}:{port}"


def wait_healthy(address: str, timeout_s: float) -> float:
    """Poll ``GET /health`` until it answers 2xx; return the seconds it took.

    Polls every 20 ms at first (envd usually needs well under a second), backing off to 200 ms."""
    started = time.monotonic()
    deadline = started + timeout_s
    delay = 0.02
    last_error = "no answer"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            try:
                r = client.get(f"{envd_url(address)}/health")
                if r.is_success:
                    return time.monotonic() - started
                last_error = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
    raise EnvdNotReady(f"envd did not answer /health within {timeout_s:.0f}s ({last_error})")


def init_envd(address: str, access_token: str, env_vars: dict[str, str]) -> None:
    """``POST /init``: the access token, the sandbox's env vars, E2B's default user and workdir,
    and the host clock (a restored or long-booting guest may be behind)."""
    body = {
        "accessToken": access_token,
        "envVars": env_vars,
        "defaultUser": DEFAULT_USER,
        "defaultWorkdir": DEFAULT_WORKDIR,
        "timestamp": datetime.now(timezone.utc).isoformat(),
    }
    try:
        r = httpx.post(f"{envd_url(address)}/init", json=body, timeout=10.0)
    except httpx.HTTPError as exc:
        raise EnvdNotReady(f"envd /init failed: {exc}") from exc
    if r.status_code != 204:
        raise EnvdNotReady(f"envd /init answered {r.status_code}: {r.text[:500]}")


def fetch_metrics(address: str, access_token: str) -> dict:
    """envd's ``GET /metrics`` (CPU, memory and disk of the sandbox as it sees them)."""
    try:
        r = httpx.get(f"{envd_url(address)}/metrics", headers={"X-Access-Token": access_token}, timeout=5.0)
    except httpx.HTTPError as exc:
        raise EnvdNotReady(f"envd /metrics failed: {exc}") from exc
    if r.status_code != 200:
        raise EnvdNotReady(f"envd /metrics answered {r.status_code}: {r.text[:300]}")
    return r.json()
