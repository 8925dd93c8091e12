"""The warm pool through the SDK: a claimed sandbox is the requester's own (env vars, metadata,
timeout, access token), looks like a freshly started one, never carries anything of an earlier
user, the pool refills, and a stopped server leaves none of its pooled sandboxes behind."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox

from sandboxd.testing.server import Server, running_server, sdk_pointed_at, spawn, stop, wait_listening

from .hostcheck import netns_names, processes_mentioning, runsc_containers

pytestmark = pytest.mark.slow
POOL = 2


def ready(server: Server) -> int:
    return httpx.get(f"{server.url}/health").json()["warmPoolReady"]


def wait_full(server: Server, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while ready(server) < POOL:
        assert time.monotonic() < deadline, f"the pool did not fill:\n{server.log()[-3000:]}"
        time.sleep(0.2)


def claimed(server: Server, sandbox_id: str) -> bool:
    return f"sandbox {sandbox_id} (base) claimed from the warm pool" in server.log()


@pytest.fixture(scope="module")
def pool_server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("pool") / "server.log"
    with running_server(data_dir, log_path, warm_pool_size=POOL) as server, sdk_pointed_at(server):
        yield server


def looks(sbx: Sandbox) -> dict[str, object]:
    """What a user sees of a fresh sandbox (things that differ between any two sandboxes left out)."""
    def run(cmd: str) -> str:
        return sbx.commands.run(cmd).stdout

    return {
        "processes": sorted(line for line in run("ps -eo user,args --no-headers").splitlines()
                            if "ps -eo" not in line and "bash -l -c" not in line),
        "home": run("ls -A /home/user"),
        "tmp": run("ls -A /tmp"),
        "whoami": run("whoami; pwd"),
        "network": re.sub(r"\d+ bytes", "", run("ip -4 addr show eth0 | grep inet; ip route")),
        "hostname": run("hostname"),
        "env": sorted(k for k in (line.split("=", 1)[0] for line in run("env").splitlines())
                      if k not in ("_", "SHLVL")),
    }


def test_claimed_sandbox_is_the_requesters_and_looks_fresh(pool_server: Server) -> None:
    wait_full(pool_server)
    sandboxes = [Sandbox.create(timeout=90, envs={"WHO": f"user{i}"}, metadata={"n": str(i)}) for i in range(POOL + 1)]
    try:
        kinds = [claimed(pool_server, s.sandbox_id) for s in sandboxes]
        assert kinds[0] and kinds[1], "a full pool must serve the first creates"
        assert len({s.sandbox_id for s in sandboxes}) == len(sandboxes)
        for i, sbx in enumerate(sandboxes):
            assert sbx.commands.run("echo $WHO").stdout == f"user{i}\n"
            info = sbx.get_info()
            assert info.metadata == {"n": str(i)}
            assert 60 < (info.end_at - datetime.now(UTC)).total_seconds() <= 91
            assert float(sbx.commands.run("cut -d' ' -f1 /proc/uptime").stdout) < 900  # the pool's max age
            # envd takes this sandbox's token only
            r = httpx.get(f"{pool_server.url}/files", params={"path": "/etc/hostname"},
                          headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983",
                                   "X-Access-Token": "not-the-token"})
            assert r.status_code == 401, r.text
        if not kinds[2]:  # the third found the pool empty (refills take a boot): compare it
            assert looks(sandboxes[0]) == looks(sandboxes[2])
        assert looks(sandboxes[0]) == looks(sandboxes[1])
    finally:
        for s in sandboxes:
            s.kill()


def test_nothing_of_an_earlier_user_reaches_the_next(pool_server: Server) -> None:
    wait_full(pool_server)
    a = Sandbox.create(timeout=60, envs={"SECRET": "a-secret"})
    a.files.write("/home/user/secret.txt", "a's data")
    a.commands.run("sleep 600", background=True)
    a_token = a._envd_access_token  # noqa: SLF001 - the token a's user holds
    a.kill()
    wait_full(pool_server)
    b = Sandbox.create(timeout=60)
    try:
        assert claimed(pool_server, b.sandbox_id) and b.sandbox_id != a.sandbox_id
        assert b.commands.run("echo -n ${SECRET:-none}").stdout == "none"
        assert not b.files.exists("/home/user/secret.txt")
        assert "sleep 600" not in b.commands.run("ps -eo args").stdout
        if a_token:
            r = httpx.get(f"{pool_server.url}/files", params={"path": "/etc/hostname"},
                          headers={"E2b-Sandbox-Id": b.sandbox_id, "E2b-Sandbox-Port": "49983",
                                   "X-Access-Token": a_token})
            assert r.status_code == 401
    finally:
        b.kill()


def test_pool_refills_and_a_stopped_server_leaves_nothing(data_dir: Path, tmp_path: Path) -> None:
    with running_server(data_dir, tmp_path / "server.log", warm_pool_size=POOL) as server, sdk_pointed_at(server):
        wait_full(server)
        sbx = Sandbox.create(timeout=60)
        assert claimed(server, sbx.sandbox_id)
        sbx.kill()
        wait_full(server)  # refilled in the background
        prefix = server.settings.net_prefix
        runsc_root = str(server.settings.runsc_root)
        assert processes_mentioning(runsc_root), "the pooled sandboxes run"
    assert processes_mentioning(runsc_root) == []
    assert not [n for n in netns_names() if n.startswith(f"{prefix}-")]


def test_a_crashed_servers_pool_is_removed_by_recovery(data_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    with running_server(data_dir, log_path, warm_pool_size=POOL) as server:
        wait_full(server)
        pooled = {p.name for p in server.settings.sandboxes_dir.iterdir()}
        assert len(pooled) == POOL
        os.killpg(server.proc.pid, signal.SIGKILL)  # the pooled sandboxes run on without a server
        server.proc.wait()
        assert pooled <= runsc_containers(server.settings)
        restarted = spawn(replace(server.settings, warm_pool_size=0), log_path)
        try:
            wait_listening(server.url, restarted, log_path)
            report = next(line for line in server.log().splitlines() if "recovery: RecoveryReport" in line
                          and "stale_containers=[]" not in line)
            assert all(sandbox_id in report for sandbox_id in pooled)
            assert not runsc_containers(server.settings) and not any(server.settings.sandboxes_dir.iterdir())
            assert not [n for n in netns_names() if n.startswith(f"{server.settings.net_prefix}-")]
        finally:
            stop(restarted)


def test_a_burst_sizes_the_pool_for_the_next_burst(data_dir: Path, tmp_path: Path) -> None:
    """Four creates at once against a pool of 1 (most boot cold); the pool then keeps four booted
    (the burst's size, under warm_pool_max), so the next burst of four is all claimed."""
    from concurrent.futures import ThreadPoolExecutor

    burst = 4
    with running_server(data_dir, tmp_path / "server.log", warm_pool_size=1, warm_pool_max=burst) as server, \
            sdk_pointed_at(server):
        deadline = time.monotonic() + 120
        while ready(server) < 1:
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.2)
        with ThreadPoolExecutor(burst) as pool:
            first = list(pool.map(lambda _: Sandbox.create(timeout=120), range(burst)))
        deadline = time.monotonic() + 240
        while ready(server) < burst:
            assert time.monotonic() < deadline, f"the pool did not grow to {burst}:\n{server.log()[-3000:]}"
            time.sleep(0.5)
        with ThreadPoolExecutor(burst) as pool:
            second = list(pool.map(lambda _: Sandbox.create(timeout=120), range(burst)))
        assert all(claimed(server, s.sandbox_id) for s in second), server.log()[-3000:]
        assert not all(claimed(server, s.sandbox_id) for s in first)
        for s in first + second:
            s.kill()
