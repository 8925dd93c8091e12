"""What the egress proxy reads a connection's host from: TLS SNI (a real ClientHello, also split
over records and cut short) and the HTTP/1 Host header; anything else names no host."""

from __future__ import annotations

import ssl

import pytest

from sandboxd.orchestrator.egress_proxy import NEED_MORE, requested_name


def _client_hello(name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_sni_of_a_real_client_hello() -> None:
    hello = _client_hello("api.example.test")
    assert requested_name(hello) == "api.example.test"
    for cut in (1, 5, 40, len(hello) - 1):
        assert requested_name(hello[:cut]) is NEED_MORE
    assert requested_name(_client_hello(None)) is None  # no SNI: no name


def test_client_hello_split_over_two_records() -> None:
    hello = _client_hello("split.example.test")
    body = hello[5:]
    half = len(body) // 2
    records = b"".join(b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part for part in (body[:half], body[half:]))
    assert requested_name(records) == "split.example.test"


@pytest.mark.parametrize("data, name", [
    (b"GET / HTTP/1.1\r\nHost: a.example.test\r\n\r\n", "a.example.test"),
    (b"POST /x HTTP/1.1\r\nhost:  A.example.test:8080\r\nX: y\r\n\r\nbody", "A.example.test"),
    (b"GET / HTTP/1.1\r\nX: y\r\n\r\n", None),
    (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", None),
    (b"SSH-2.0-OpenSSH\r\n", None),
    (b"\x00\x00\x00", None),
    (b"\x17\x03\x03\x00\x01x", None),
])
def test_http_host_and_other_protocols(data: bytes, name: str | None) -> None:
    assert requested_name(data) == name


def test_partial_http_waits_for_the_headers() -> None:
    assert requested_name(b"GE") is NEED_MORE
    assert requested_name(b"GET / HTTP/1.1\r\nHost: a.example.test\r\n") is NEED_MORE
