"""The orchestrator's side of envd: wait until it answers, then hand it its configuration.

A sandbox is handed to a client only after this succeeded (the SDK sends its first RPC right after
create, with no readiness probe of its own).
"""

from __future__ import annotations

import base64
import functools
import json
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from sandboxd.envd.contract import DEFAULT_USER, DEFAULT_WORKDIR, ENVD_PORT, INIT_ENTROPY_FIELD
from sandboxd.errors import StartError


class EnvdNotReady(StartError):
    """envd did not answer /health (or refused /init) before the deadline."""


@functools.cache
def _client() -> httpx.Client:
    """The one client of every envd call. Making an httpx client builds an SSL context (CA
    bundle loaded: 20-150 ms measured here), which each call paid before; envd is plain HTTP, so
    no CA is loaded at all. No keep-alive: a slot's address is reused by later sandboxes."""
    return httpx.Client(verify=False, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))


def envd_url(address: str, port: int = ENVD_PORT) -> str:
    return f"http://{address}:{port}"


def wait_healthy(address: str, timeout_s: float) -> float:
    """Poll ``GET /health`` until it answers 2xx; return the seconds it took.

    Every 10 ms for the first 3 s (a refused connection costs well under a millisecond, and each
    poll interval is time a create may wait for nothing), then every 100 ms."""
    started = time.monotonic()
    deadline = started + timeout_s
    last_error = "no answer"
    client = _client()
    while (now := time.monotonic()) < deadline:
        try:
            r = client.get(f"{envd_url(address)}/health", timeout=2.0)
            if r.is_success:
                return time.monotonic() - started
            last_error = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(0.01 if now - started < 3 else 0.1)
    raise EnvdNotReady(f"envd did not answer /health within {timeout_s:.0f}s ({last_error})")


def envd_answers(address: str, timeout_s: float = 2.0) -> bool:
    """One ``GET /health`` within ``timeout_s``: does the sandbox's envd respond right now?"""
    try:
        return _client().get(f"{envd_url(address)}/health", timeout=timeout_s).is_success
    except httpx.HTTPError:
        return False


def sync_guest(address: str, access_token: str, timeout_s: float = 60) -> None:
    """``sync`` as root inside the sandbox: file data the guest still caches reaches its disk
    (before a pause that keeps the disk alone, the runtime is stopped without a shutdown)."""
    code, output = run_process(address, access_token, "root", "sync", {}, "/", wait=True, timeout_s=timeout_s)
    if code != 0:
        raise EnvdNotReady(f"sync in the sandbox failed (exit code {code}): {output[-500:]}")


def init_envd(address: str, access_token: str | None, env_vars: dict[str, str], user: str = DEFAULT_USER,
              workdir: str = DEFAULT_WORKDIR, current_token: str | None = None, restored: bool = False) -> None:
    """``POST /init``: the access token, the sandbox's env vars, its default user and workdir
    (E2B's ``user`` and ``/home/user`` unless the template says otherwise), and the host clock
    (a restored or long-booting guest may be behind). ``current_token``: the one envd holds, if
    not ``access_token`` (a sandbox restored from another's memory gets its own token).
    ``restored``: the guest's memory was restored from a snapshot others may share: new entropy
    goes with it, so its kernel's random state is its own (envd/entropy.py)."""
    body = {
        **({"accessToken": access_token} if access_token else {}),  # none: E2B's v1 ``secure: false``
        "envVars": env_vars,
        "defaultUser": user,
        "defaultWorkdir": workdir,
        "timestamp": datetime.now(UTC).isoformat(),
        **({INIT_ENTROPY_FIELD: base64.b64encode(secrets.token_bytes(64)).decode()} if restored else {}),
    }
    # the token header lets a later /init (after a resume: clock sync; a restore: a new token) through
    held = access_token if current_token is None else current_token
    try:
        r = _client().post(f"{envd_url(address)}/init", json=body, headers={"X-Access-Token": held or ""},
                           timeout=10.0)
    except httpx.HTTPError as exc:
        raise EnvdNotReady(f"envd /init failed: {exc}") from exc
    if r.status_code != 204:
        raise EnvdNotReady(f"envd /init answered {r.status_code}: {r.text[:500]}")


def trust_ca(address: str, access_token: str, pem: bytes, bundle: str, alone: str) -> None:
    """Add a CA certificate to the sandbox's system bundle (``bundle``, made if the template has
    none; kept as it is if the CA is in it already) and write it alone to ``alone``, as root."""
    headers = {"X-Access-Token": access_token}
    url = f"{envd_url(address)}/files"
    try:
        r = _client().get(url, params={"path": bundle, "username": "root"}, headers=headers, timeout=10.0)
        if r.status_code not in (200, 404):
            raise EnvdNotReady(f"envd GET {bundle} answered {r.status_code}: {r.text[:300]}")
        current = r.content if r.status_code == 200 else b""
        writes = [(alone, pem)]
        if pem not in current:
            writes.append((bundle, current + (b"" if not current or current.endswith(b"\n") else b"\n") + pem))
        for path, body in writes:
            r = _client().post(url, params={"path": path, "username": "root"}, content=body,
                               headers={**headers, "Content-Type": "application/octet-stream"}, timeout=10.0)
            if r.status_code != 200:
                raise EnvdNotReady(f"envd POST {path} answered {r.status_code}: {r.text[:300]}")
    except httpx.HTTPError as exc:
        raise EnvdNotReady(f"envd could not be given the egress CA: {exc}") from exc


def fetch_metrics(address: str, access_token: str) -> dict[str, Any]:
    """envd's ``GET /metrics`` (CPU, memory and disk of the sandbox as it sees them)."""
    try:
        r = _client().get(f"{envd_url(address)}/metrics", headers={"X-Access-Token": access_token}, timeout=5.0)
    except httpx.HTTPError as exc:
        raise EnvdNotReady(f"envd /metrics failed: {exc}") from exc
    if r.status_code != 200:
        raise EnvdNotReady(f"envd /metrics answered {r.status_code}: {r.text[:300]}")
    return r.json()


def _envelope(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack(">BI", 0, len(payload)) + payload


def _events(chunks: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """Decode Connect streaming envelopes (flag byte, 4-byte length, JSON) from a byte stream."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        while len(buf) >= 5:
            flags, size = struct.unpack(">BI", buf[:5])
            if len(buf) < 5 + size:
                break
            body, buf = buf[5:5 + size], buf[5 + size:]
            if flags & 0x02:  # end of stream: {} or {"error": ...}
                end = json.loads(body or b"{}")
                if end.get("error"):
                    raise EnvdNotReady(f"envd process error: {end['error']}")
                return
            yield json.loads(body)


def run_process(address: str, access_token: str, user: str, command: str, env: dict[str, str],
                cwd: str, wait: bool, timeout_s: float = 60) -> tuple[int | None, str]:
    """Run ``bash -l -c command`` through envd's ``process.Process/Start``, as the SDK would.

    ``wait=False`` returns once the process started (closing the stream leaves it running, which
    is how a template's start command keeps going); ``wait=True`` returns its exit code and output."""
    return _run(address, access_token, user, ["/bin/bash", "-l", "-c", command], env, cwd, wait, timeout_s)


def _run(address: str, access_token: str, user: str, argv: list[str], env: dict[str, str], cwd: str,
         wait: bool, timeout_s: float) -> tuple[int | None, str]:
    request = {"process": {"cmd": argv[0], "args": argv[1:], "envs": env, "cwd": cwd}, "stdin": False}
    headers = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1",
               "X-Access-Token": access_token,
               "Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode(),
               "Connect-Timeout-Ms": str(int(timeout_s * 1000))}
    output: list[str] = []
    try:
        with _client().stream("POST", f"{envd_url(address)}/process.Process/Start", content=_envelope(request),
                          headers=headers, timeout=httpx.Timeout(timeout_s + 5)) as r:
            if r.status_code != 200:
                raise EnvdNotReady(f"envd refused the command ({r.status_code}): {r.read()[:300]!r}")
            for event in _events(r.iter_bytes()):
                ev = event.get("event", {})
                if "start" in ev and not wait:
                    return None, ""
                for key in ("stdout", "stderr"):
                    if key in ev.get("data", {}):
                        output.append(base64.b64decode(ev["data"][key]).decode(errors="replace"))
                if "end" in ev:
                    return int(ev["end"].get("exitCode", 0)), "".join(output)[-4000:]
    except httpx.HTTPError as exc:
        raise EnvdNotReady(f"envd process call failed: {exc}") from exc
    raise EnvdNotReady("envd ended the process stream without an end event")


class OutputWriter(Protocol):
    def write(self, stream: str, text: str) -> None: ...
    def close(self) -> None: ...


def start_logged(address: str, access_token: str, user: str, command: str, env: dict[str, str], cwd: str,
                 output: OutputWriter, on_end: Callable[[str], None]) -> None:
    """Start ``bash -l -c command`` and return once it runs; a thread then hands its output to
    ``output`` and how it ended to ``on_end`` (a template's start command: its output is the
    sandbox's log). No ``Connect-Timeout-Ms``: envd would kill the process when it passed."""
    request = {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", command], "envs": env, "cwd": cwd},
               "stdin": False}
    headers = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1",
               "X-Access-Token": access_token,
               "Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}
    settled = threading.Event()  # the process started, or the call failed before it did
    running: list[bool] = []
    failure: list[str] = []

    def follow() -> None:
        ended = "its output stream closed before it ended"
        try:
            with _client().stream("POST", f"{envd_url(address)}/process.Process/Start", content=_envelope(request),
                              headers=headers, timeout=httpx.Timeout(10.0, read=None)) as r:
                if r.status_code != 200:
                    failure.append(f"envd refused the command ({r.status_code}): {r.read()[:300]!r}")
                    return
                for event in _events(r.iter_bytes()):
                    ev = event.get("event", {})
                    if "start" in ev:
                        running.append(True)
                        settled.set()
                    for key in ("stdout", "stderr"):
                        if key in ev.get("data", {}):
                            output.write(key, base64.b64decode(ev["data"][key]).decode(errors="replace"))
                    if "end" in ev:
                        ended = f"exited with code {int(ev['end'].get('exitCode', 0))}"
        except (httpx.HTTPError, EnvdNotReady) as exc:
            failure.append(f"envd process call failed: {exc}")
            ended = f"its output stream failed: {exc}"
        finally:
            output.close()
            if running:
                on_end(ended)
            settled.set()

    threading.Thread(target=follow, name="start-cmd", daemon=True).start()
    settled.wait(timeout=30)
    if not running:
        raise EnvdNotReady(failure[0] if failure else "envd ended the process stream before it started")
