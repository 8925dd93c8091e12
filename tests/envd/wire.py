"""Test helpers speaking Connect by hand (envelopes over httpx) and via our generated clients."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

from sandboxd.envd.rpc.filesystem.filesystem_connect import FilesystemClientSync
from sandboxd.envd.rpc.process.process_connect import ProcessClientSync

STREAM_HEADERS = {
    "content-type": "application/connect+json",
    "connect-protocol-version": "1",
    "connect-content-encoding": "identity",
    "connect-accept-encoding": "identity",
}
UNARY_HEADERS = {"content-type": "application/json", "connect-protocol-version": "1"}


def envelope(msg: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(msg).encode()
    return struct.pack(">BI", flags, len(data)) + data


def parse_envelopes(body: bytes) -> list[tuple[int, dict[str, Any]]]:
    """Split a Connect stream body into (flags, json) frames; asserts the framing is exact."""
    out: list[tuple[int, dict[str, Any]]] = []
    i = 0
    while i < len(body):
        assert len(body) - i >= 5, f"truncated envelope header at {i}"
        flags, length = struct.unpack(">BI", body[i : i + 5])
        payload = body[i + 5 : i + 5 + length]
        assert len(payload) == length, "truncated envelope payload"
        out.append((flags, json.loads(payload)))
        i += 5 + length
    return out


def chunked(frames: Iterable[bytes]) -> Iterator[bytes]:
    """A generator body: httpx sends it with Transfer-Encoding: chunked, like the SDK."""
    yield from frames


def basic_auth(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()


def start_stream(
    client: httpx.Client, url: str, request: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[httpx.Response, list[tuple[int, dict[str, Any]]]]:
    """POST /process.Process/Start with a chunked single-envelope body; returns all frames."""
    r = client.post(
        f"{url}/process.Process/Start",
        content=chunked([envelope(request)]),
        headers={**STREAM_HEADERS, **(headers or {})},
    )
    return r, parse_envelopes(r.content)


def events(frames: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The ProcessEvent of each message frame (end-of-stream excluded)."""
    return [f["event"] for flags, f in frames if flags == 0]


def stdout_of(evs: list[dict[str, Any]], stream: str = "stdout") -> bytes:
    return b"".join(base64.b64decode(e["data"][stream]) for e in evs if "data" in e and stream in e["data"])


def process_client(url: str, **kw: Any) -> ProcessClientSync:
    from connectrpc.codec import proto_json_codec

    return ProcessClientSync(url, codec=proto_json_codec(), send_compression=None, accept_compression=(), **kw)


def filesystem_client(url: str, **kw: Any) -> FilesystemClientSync:
    from connectrpc.codec import proto_json_codec

    return FilesystemClientSync(url, codec=proto_json_codec(), send_compression=None, accept_compression=(), **kw)
