"""Run every check in order and collect the findings (the CLI renders them)."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from sandboxd.config import Settings
from sandboxd.doctor import data, host, sandboxes
from sandboxd.doctor.report import Finding
from sandboxd.store.db import Database

ProgressFn = Callable[[Finding], None]


def server_health(url: str) -> dict[str, object] | None:
    """The server's ``GET /health`` body, or None if it does not answer 200."""
    try:
        r = httpx.get(f"{url.rstrip('/')}/health", timeout=5, verify=False)
        return dict(r.json()) if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def check_server(url: str, required: bool) -> Finding:
    try:
        r = httpx.get(f"{url.rstrip('/')}/health", timeout=5, verify=False)
    except httpx.HTTPError as exc:
        msg = f"{url} does not answer: {type(exc).__name__}"
        fix = "sandboxd serve   (or ./sandboxd.sh serve)"
        return Finding.fail("server", msg, fix) if required else Finding.warn("server", msg, fix)
    if r.status_code != 200:
        return Finding.fail("server", f"{url}/health answered {r.status_code}",
                            "read the server's log; restart it: sandboxd serve")
    return Finding.ok("server", f"{url} answers /health")


def run_checks(settings: Settings, *, url: str | None = None, quick: bool = False, everything: bool = False,
               progress: ProgressFn = lambda _: None) -> list[Finding]:
    """All checks. ``quick`` skips the slow ones (checksums, envd starting in each template);
    ``everything`` verifies every build and layer, not only those in use. ``url``: the server to
    reach (required then); by default the configured host and port, where a stopped server is
    only a warning."""
    findings: list[Finding] = []

    def add(*new: Finding) -> None:
        for f in new:
            findings.append(f)
            progress(f)

    for check in (host.check_root, host.check_tools, lambda: host.check_runsc(settings), host.check_qemu,
                  lambda: host.check_kvm(settings, probe=not quick), host.check_namespaces, host.check_nftables,
                  host.check_nbd_module):
        add(check())
    add(data.check_writable(settings))
    if not settings.data_dir.is_dir():
        add(check_server(url or settings_url(settings), url is not None))
        return findings
    if settings.database_url is None and not (settings.data_dir / "db.sqlite").exists():
        add(Finding.fail("base template", f"{settings.data_dir} has no database: no server ran with this data dir",
                         f"sandboxd serve --data-dir {settings.data_dir}   (builds the base template)"))
        add(check_server(url or settings_url(settings), url is not None))
        return findings
    db = Database(settings.db_url)
    rows = db.list_sandboxes()
    add(data.check_free_space(settings, rows))
    add(data.check_base_template(settings, db, expected_base_build()))
    in_use = data.builds_in_use(db)
    if not quick:
        add(*data.check_checksums(settings, in_use, everything))
        add(*data.check_envd_gate(settings, db, in_use))
    add(sandboxes.check_vm_disks(settings))
    health = server_health(url or settings_url(settings))
    pooled = health.get("warmPoolReady", 0) if health is not None else None
    add(sandboxes.check_leftovers(settings, db.list_sandboxes(), int(pooled) if isinstance(pooled, int) else None))
    add(check_server(url or settings_url(settings), url is not None))
    return findings


def settings_url(settings: Settings) -> str:
    if settings.domain:
        return f"https://{settings.host}:{settings.port}"
    return f"http://{settings.host}:{settings.port}"


def expected_base_build() -> str:
    """The build id the current base recipe, mirror and envd bundle make (cheap: hashes only)."""
    from sandboxd.templates.base import base_inputs

    return base_inputs().build_id
