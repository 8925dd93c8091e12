"""Network slots on the real kernel: namespaces, veths, DNAT and the forward/input guards.

Only loopback and namespaces these tests create are used; listeners bind to slot addresses.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from sandboxd.orchestrator.egress import OPEN_EGRESS
from sandboxd.orchestrator.network import GATEWAY_ADDRESS, GUEST_ADDRESS, NetworkError, NetworkSlot, SlotPool


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def _netns_names() -> set[str]:
    return {line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()}


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def can_connect(netns: str | None, host: str, port: int, timeout: float = 1.0) -> bool:
    """A TCP connect from inside ``netns`` (None: this host), in a fresh process."""
    code = f"import socket; socket.create_connection(({host!r}, {port}), timeout={timeout}).close()"
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True).returncode == 0


@contextlib.contextmanager
def http_server(netns: str, bind: str, port: int, log: Path) -> Iterator[None]:
    """``python -m http.server`` inside ``netns``; waits until it accepts, from inside."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "http.server",
                                 "--bind", bind, str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not can_connect(netns, bind, port, timeout=0.5):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def host_listener(address: str) -> Iterator[int]:
    """A TCP listener in the host namespace on one slot address; yields its port."""
    with socket.socket() as s:
        s.bind((address, 0))
        s.listen()
        yield s.getsockname()[1]


def test_prefix_must_be_short_and_names_unambiguous() -> None:
    for bad in ("1ab", "toolong", "a-b", "AB", ""):
        with pytest.raises(ValueError):
            SlotPool(prefix=bad)
    assert SlotPool(prefix="ab1").slot(2).host_veth != SlotPool(prefix="ab").slot(12).host_veth


def test_addresses_are_30_blocks_over_the_whole_16() -> None:
    pool = SlotPool(prefix="sbx", base_cidr="10.213.0.0/16", max_slots=100_000)
    assert pool.max_slots == 16384
    assert (pool.slot(0).host_side_address, pool.slot(0).host_address) == ("10.213.0.1", "10.213.0.2")
    assert pool.slot(64).host_address == "10.213.1.2"
    last = pool.slot(16383)
    assert (last.host_side_address, last.host_address) == ("10.213.255.253", "10.213.255.254")
    assert last.guest_netns_path == "/var/run/netns/sbx-16383-g"
    assert len(SlotPool(prefix="abcdef").slot(16383).host_veth) <= 15  # IFNAMSIZ - 1


def test_acquire_builds_the_slot_and_release_removes_it(slot_pool: SlotPool) -> None:
    a, b = slot_pool.acquire(), slot_pool.acquire()
    assert (a.index, b.index) == (0, 1)
    assert {a.netns, a.guest_netns, b.netns, b.guest_netns} <= _netns_names()
    assert Path(a.guest_netns_path).exists()
    assert f"{a.host_side_address}/30" in _ip("-o", "addr", "show", "dev", a.host_veth)
    assert f"{a.host_address}/30" in _ip("-n", a.netns, "-o", "addr", "show", "dev", "eth-h")
    assert f"{GATEWAY_ADDRESS}/30" in _ip("-n", a.netns, "-o", "addr", "show", "dev", "gl")
    assert f"{GUEST_ADDRESS}/30" in _ip("-n", a.guest_netns, "-o", "addr", "show", "dev", "eth0")
    assert f"default via {GATEWAY_ADDRESS} dev eth0" in _ip("-n", a.guest_netns, "route")
    assert "UP" in _ip("-n", a.guest_netns, "-br", "link", "show", "dev", "lo")
    assert subprocess.run(["ip", "netns", "exec", a.netns, "sysctl", "-n", "net.ipv4.ip_forward"],
                          capture_output=True, text=True).stdout.strip() == "1"
    assert slot_pool.existing() == [0, 1]

    slot_pool.release(a)
    slot_pool.release(a)  # idempotent
    assert not {a.netns, a.guest_netns} & _netns_names()
    assert not _link_exists(a.host_veth)
    assert slot_pool.existing() == [1]
    assert slot_pool.acquire().index == 0  # the lowest free index is reused


def test_host_reaches_only_its_guest_and_guests_reach_nothing(slot_pool: SlotPool, tmp_path: Path) -> None:
    a, b = slot_pool.acquire(), slot_pool.acquire()
    with contextlib.ExitStack() as stack:
        stack.enter_context(http_server(a.guest_netns, GUEST_ADDRESS, 8080, tmp_path / "a.log"))
        stack.enter_context(http_server(b.netns, "0.0.0.0", 8081, tmp_path / "b-slot.log"))
        port_a = stack.enter_context(host_listener(a.host_side_address))
        port_b = stack.enter_context(host_listener(b.host_side_address))

        r = httpx.get(f"http://{a.host_address}:8080/", timeout=5)
        assert r.status_code == 200
        assert a.host_side_address in (tmp_path / "a.log").read_text()  # the guest sees the host
        assert can_connect(a.guest_netns, GUEST_ADDRESS, 8080)  # the probe itself works in a guest
        assert can_connect(b.netns, "127.0.0.1", 8081)  # ... and in a slot namespace

        must_fail = [
            # B's guest: not A's guest (by any address), not the host, not its own slot namespace.
            (b.guest_netns, a.host_address, 8080), (b.guest_netns, a.host_side_address, port_a),
            (b.guest_netns, b.host_side_address, port_b), (b.guest_netns, GATEWAY_ADDRESS, 8081),
            (b.guest_netns, b.host_address, 8081),
            (a.guest_netns, a.host_side_address, port_a),  # A's guest: not the host either
            (None, b.host_address, 8081),  # the host reaches the guest, never the slot namespace
        ]
        with ThreadPoolExecutor(len(must_fail)) as pool:  # each probe waits out its 1 s timeout
            reached = [probe for probe, ok in zip(must_fail, pool.map(lambda p: can_connect(*p), must_fail), strict=True) if ok]
        assert reached == []


def test_the_guard_is_what_keeps_the_guest_from_host_and_gateway(slot_pool: SlotPool, tmp_path: Path) -> None:
    """The guard (not the egress rules, not luck) blocks them: with it and the egress rules
    removed, the same probes connect."""
    slot = slot_pool.acquire(OPEN_EGRESS)
    with http_server(slot.netns, "0.0.0.0", 8081, tmp_path / "slot.log"), \
            host_listener(slot.host_side_address) as port:
        probes = [(slot.guest_netns, slot.host_side_address, port), (slot.guest_netns, GATEWAY_ADDRESS, 8081)]
        assert [can_connect(*p) for p in probes] == [False, False]
        _nft(slot.netns, "delete table inet sbx_guard; delete table ip sbx_egress")
        assert [can_connect(*p) for p in probes] == [True, True]


def _nft(netns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script + "\n", text=True, check=True)


def test_failed_acquire_removes_only_what_it_made(slot_pool: SlotPool) -> None:
    clash = slot_pool.slot(0).host_veth
    _ip("link", "add", clash, "type", "veth", "peer", "name", f"{slot_pool.prefix}-0-x")
    try:
        with pytest.raises(NetworkError, match="File exists"):
            slot_pool.acquire()
        assert slot_pool.existing() == []
        assert _link_exists(clash), "the undo removed an interface it did not make"
    finally:
        _ip("link", "del", clash)
    assert slot_pool.acquire().index == 0


def test_cleanup_stale_after_a_restart(slot_pool: SlotPool) -> None:
    for _ in range(3):
        slot_pool.acquire()
    orphan = slot_pool.slot(7).host_veth  # a host veth whose namespaces are gone
    _ip("link", "add", orphan, "type", "veth", "peer", "name", f"{slot_pool.prefix}-7-x")
    restarted = SlotPool(prefix=slot_pool.prefix, base_cidr=str(slot_pool.network))
    assert restarted.existing() == [0, 1, 2]
    assert restarted.cleanup_stale(keep={1}) == [0, 2, 7]
    assert restarted.existing() == [1]
    assert not _link_exists(orphan) and not _link_exists(slot_pool.slot(0).host_veth)
    assert _link_exists(slot_pool.slot(1).host_veth)
    assert restarted.acquire().index == 0  # kept slot 1 stays reserved
    assert restarted.acquire().index == 2


def test_restore_guest_address_is_idempotent_and_refused_while_in_use(slot_pool: SlotPool) -> None:
    slot = slot_pool.acquire()
    _ip("-n", slot.guest_netns, "addr", "flush", "dev", "eth0")  # what runsc does at start
    assert GUEST_ADDRESS not in _ip("-n", slot.guest_netns, "-o", "addr")
    slot_pool.restore_guest_address(slot)
    slot_pool.restore_guest_address(slot)
    assert f"{GUEST_ADDRESS}/30" in _ip("-n", slot.guest_netns, "-o", "addr", "show", "dev", "eth0")
    assert f"default via {GATEWAY_ADDRESS}" in _ip("-n", slot.guest_netns, "route")
    with _process_in(slot.guest_netns), pytest.raises(NetworkError, match="in use"):
        slot_pool.restore_guest_address(slot)


@contextlib.contextmanager
def _process_in(netns: str) -> Iterator[None]:
    proc = subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "60"])
    try:
        target = os.stat(f"/var/run/netns/{netns}").st_ino
        deadline = time.monotonic() + 5
        while not _in_netns(proc.pid, target) and time.monotonic() < deadline:
            time.sleep(0.01)
        yield
    finally:
        proc.kill()
        proc.wait()


def _in_netns(pid: int, inode: int) -> bool:
    with contextlib.suppress(OSError):
        return os.stat(f"/proc/{pid}/ns/net").st_ino == inode
    return False


def test_concurrent_acquires_get_distinct_working_slots(slot_pool: SlotPool) -> None:
    slots: list[NetworkSlot] = []
    errors: list[BaseException] = []

    def take() -> None:
        try:
            slots.append(slot_pool.acquire())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(s.index for s in slots) == list(range(8))
    assert len({ipaddress.ip_address(s.host_address) for s in slots}) == 8
    for s in slots:
        slot_pool.release(s)
    assert slot_pool.existing() == []
