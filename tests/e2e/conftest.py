"""A real sandboxd server (subprocess, real gVisor sandboxes) and the real ``e2b`` SDK pointed at it.

The server uses the shared test data dir (the base template build is cached there by build id)
and its own network prefix and subnet, so it never touches a developer's server on the same host.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.store.db import Database
from sandboxd.testing.server import Server, running_server, sdk_pointed_at

__all__ = ["SLOW", "Server"]
#: seconds the SDK waits for a microVM create, connect, pause, fork or snapshot (minutes under TCG)
SLOW = 600


@pytest.fixture(scope="session")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    try:
        with running_server(data_dir, log_path) as srv:
            yield srv
    finally:
        if log_path.exists():
            print(f"--- server log ({log_path}) tail ---\n{log_path.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="session")
def sdk_env(server: Server) -> Iterator[Server]:
    """The unchanged SDK, pointed at our server through its environment variables."""
    with sdk_pointed_at(server):
        yield server


@pytest.fixture
def sandbox(sdk_env: Server) -> Iterator[object]:
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=120)
    try:
        yield sbx
    finally:
        sbx.kill()


@pytest.fixture(scope="module")
def vm_env(data_dir: Path, tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[Server]:
    """A server for one module of microVM tests: envd in a VM emulated by TCG on a loaded host can
    take well over the default 30 s to answer after a boot (CPython's start, instruction by
    instruction). Give its SDK calls that boot a ``request_timeout`` to match (``SLOW``).
    Booted images are off unless the module sets ``MICROVM_BOOT_IMAGES = 1``: making one is a
    second TCG boot behind the first create, which would slow every other module's tests. A module
    may also pin the warm pool's size (``WARM_POOL_SIZE``) whatever the suite's setting."""
    log_path = tmp_path_factory.mktemp("vm-server") / "server.log"
    overrides: dict[str, object] = {"microvm_boot_images": getattr(request.module, "MICROVM_BOOT_IMAGES", 0)}
    if hasattr(request.module, "WARM_POOL_SIZE"):
        overrides["warm_pool_size"] = request.module.WARM_POOL_SIZE
    try:
        with running_server(data_dir, log_path, envd_ready_timeout_s=240.0, **overrides) as srv, \
                sdk_pointed_at(srv):
            yield srv
    finally:
        if log_path.exists():
            print(f"--- server log ({log_path}) tail ---\n{log_path.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def vm_template(vm_env: Server) -> str:
    db = Database(vm_env.settings.db_url)
    base = db.find_template("base")
    assert base is not None
    db.set_template("base-vm", base.build_id, runtime="microvm")
    return "base-vm"
