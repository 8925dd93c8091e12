"""envd's own HTTP server (``sandboxd.envd.server``) over real sockets, driving a small ASGI app
(server_app.py) in a subprocess: keep-alive, streamed bodies both ways, 100-continue, HTTP/1.0,
disconnects, errors, the idle timeout and SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest

from .conftest import free_port

APP = Path(__file__).with_name("server_app.py")
WAIT_S = 15.0  # a generous bound for anything that must happen (never a speed check)


@dataclass
class Served:
    port: int
    proc: subprocess.Popen[bytes]
    marker: Path

    def http(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)

    def sock(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S)
        return s

    def get_json(self, path: str) -> object:
        c = self.http()
        try:
            c.request("GET", path)
            r = c.getresponse()
            assert r.status == 200
            return json.loads(r.read())
        finally:
            c.close()


def _serve(tmp_path: Path, keep_alive_s: float) -> Iterator[Served]:
    port = free_port()
    marker = tmp_path / "lifespan"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(APP), str(port), str(keep_alive_s), str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + WAIT_S
    while True:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the server did not listen"
            time.sleep(0.05)
    try:
        yield Served(port, proc, marker)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _serve(tmp_path_factory.mktemp("server"), 330)


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


class Client:
    """h11's client side over a socket: reads responses event by event."""

    def __init__(self, s: socket.socket) -> None:
        self.s = s
        self.conn = h11.Connection(h11.CLIENT)

    def send(self, *events: object) -> None:
        for e in events:
            data = self.conn.send(e)  # type: ignore[arg-type]
            if data:
                self.s.sendall(data)

    def next(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.s.recv(65536))
                continue
            return event


def test_keep_alive_reuses_one_connection(served: Served) -> None:
    c = served.http()
    clients = set()
    for i in range(3):
        c.request("GET", f"/whoami?i={i}")
        r = c.getresponse()
        assert r.status == 200 and r.getheader("date")
        assert r.getheader("server") is None
        body = json.loads(r.read())
        assert body["query"] == f"i={i}"
        clients.add(tuple(body["client"]))
    c.close()
    assert len(clients) == 1  # the server kept the connection open between requests


def test_chunked_upload_streams_with_backpressure(served: Served) -> None:
    payload = os.urandom(1 << 20)
    c = served.http()

    def pieces() -> Iterator[bytes]:
        for i in range(0, 8 * len(payload), 256 * 1024):
            yield payload[i % len(payload): i % len(payload) + 256 * 1024]

    c.request("POST", "/count?slow", body=pieces(), encode_chunked=True,
              headers={"Transfer-Encoding": "chunked"})
    r = c.getresponse()
    body = json.loads(r.read())
    assert body["total"] == 8 * len(payload)
    # The app waited before reading: the server paused reading instead of buffering 8 MiB for it.
    assert body["largest"] < 1 << 20
    c.close()


def test_content_length_upload_and_pipelined_request(served: Served) -> None:
    s = served.sock()
    s.sendall(b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
              b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = read_all(s)
    s.close()
    assert out.count(b"HTTP/1.1 200 ") == 2
    assert b'"total": 5' in out and b'"http_version": "1.1"' in out


def test_expect_100_continue(served: Served) -> None:
    s = served.sock()
    s.sendall(b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n"
              b"Connection: close\r\n\r\n")
    first = s.recv(65536)  # the server asks for the body: the client sent none yet
    assert first.startswith(b"HTTP/1.1 100 Continue\r\n"), first
    s.sendall(b"abc")
    out = first + read_all(s)
    s.close()
    assert b"HTTP/1.1 200 " in out and b'"total": 3' in out


def test_streaming_response_is_flushed_per_chunk(served: Served) -> None:
    """/echo answers each request body message at once: the client only sends the next piece
    after it read the previous one back, so a buffered response would hang here."""
    c = Client(served.sock())
    c.send(h11.Request(method="POST", target="/echo",
                       headers=[("host", "x"), ("transfer-encoding", "chunked")]))
    response = c.next()
    assert isinstance(response, h11.Response) and response.status_code == 200
    assert (b"transfer-encoding", b"chunked") in list(response.headers)
    for i in range(5):
        piece = f"piece {i}".encode()
        c.send(h11.Data(data=piece))
        got = b""
        while got != piece:
            event = c.next()
            assert isinstance(event, h11.Data), event
            got += event.data
    c.send(h11.EndOfMessage())
    assert isinstance(c.next(), h11.EndOfMessage)
    c.s.close()


def test_disconnect_reaches_the_app(served: Served) -> None:
    s = served.sock()
    s.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while b"first" not in got:
        got += s.recv(65536)
    s.close()
    deadline = time.monotonic() + WAIT_S
    while "hold: disconnect" not in served.get_json("/events"):  # type: ignore[operator]
        assert time.monotonic() < deadline, "the app never got http.disconnect"
        time.sleep(0.05)


def test_http_1_0_and_connection_close(served: Served) -> None:
    s = served.sock()
    s.sendall(b"GET /whoami HTTP/1.0\r\n\r\n")
    out = read_all(s)  # the server closes after an HTTP/1.0 response
    s.close()
    assert out.startswith(b"HTTP/1.1 200 ") and b'"http_version": "1.0"' in out

    s = served.sock()
    s.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = read_all(s)
    s.close()
    assert out.startswith(b"HTTP/1.1 200 ") and b"connection: close" in out.lower()


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",  # over the header bound
])
def test_malformed_request_is_400_and_closed(served: Served, request_bytes: bytes) -> None:
    s = served.sock()
    s.sendall(request_bytes)
    out = read_all(s)
    s.close()
    assert out.startswith(b"HTTP/1.1 400 "), out[:100]
    assert served.get_json("/whoami")  # still serving


def test_app_exception_is_500_then_close_mid_response(served: Served) -> None:
    c = served.http()
    c.request("GET", "/boom")
    r = c.getresponse()
    assert r.status == 500 and r.read() == b"Internal Server Error"
    c.close()

    s = served.sock()
    s.sendall(b"GET /boom-late HTTP/1.1\r\nHost: x\r\n\r\n")
    out = read_all(s)  # closed without the chunked body's end
    s.close()
    assert out.startswith(b"HTTP/1.1 200 ") and b"partial" in out and not out.endswith(b"0\r\n\r\n")
    assert served.get_json("/whoami")  # the server keeps serving


def test_response_h11_refuses_closes_the_connection(served: Served) -> None:
    s = served.sock()
    s.sendall(b"GET /bad-header HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_all(s) == b""  # nothing half-written: the head never left, the connection closed
    s.close()
    assert served.get_json("/whoami")


def test_idle_connection_is_closed_after_keep_alive(tmp_path: Path) -> None:
    for srv in _serve(tmp_path, 0.5):
        s = srv.sock()
        s.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
        out = read_all(s)  # the response, then nothing until the server closes the idle connection
        assert out.startswith(b"HTTP/1.1 200 ") and out.count(b"HTTP/1.1") == 1 and out.endswith(b"}")
        s.close()


def test_sigterm_runs_lifespan_shutdown_and_exits(tmp_path: Path) -> None:
    for srv in _serve(tmp_path, 330):
        idle = srv.sock()  # an idle keep-alive connection must not hold the exit up
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=WAIT_S) == -signal.SIGTERM
        assert srv.marker.read_text() == "shutdown\n"
        assert read_all(idle) == b""
        idle.close()
