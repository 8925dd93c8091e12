"""The egress tests' fake internet (sandboxd.testing.fake_internet) when several test runs on one
host make theirs at once: each gets addresses no other uses, its hosts answer as themselves
(never through another run's namespace), and its DNS answers as soon as it is handed out.

Only namespaces these tests create and TEST-NET addresses are used.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from sandboxd.testing.fake_internet import FakeInternet, _answers, fake_internet


def _get(address: str) -> str:
    with socket.create_connection((address, 8080), timeout=3) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode().split()[0]


def test_concurrent_fake_internets_never_share_an_address() -> None:
    made: list[FakeInternet] = []
    answers: dict[str, str] = {}
    errors: list[BaseException] = []
    ready, done = threading.Barrier(7), threading.Event()

    def one(i: int) -> None:
        with contextlib.ExitStack() as stack:
            try:
                net = stack.enter_context(fake_internet(names={f"n{i}.test": "1"}))
                made.append(net)
                assert net.dns is not None and _answers(net.dns, f"n{i}.test")  # no wait: ready when handed out
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
            ready.wait(60)  # all of them exist at once
            try:
                for host in net.hosts:
                    answers[host] = _get(host)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
            done.wait(60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    ready.wait(60)
    for _ in range(100):
        if len(answers) == 12 or errors:
            break
        threading.Event().wait(0.1)
    done.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    addresses = [a for net in made for a in (net.host_side, *net.hosts, net.dns)]
    assert len(addresses) == len(set(addresses)) == 24
    assert answers == {h: h for net in made for h in net.hosts}  # each host answered as itself
