"""envd's own Connect layer (envd/connect.py) on the wire: what connectrpc's server answered, case by
case, and binary protobuf / gRPC-Web still answered, by protobuf-py loaded only then."""

from __future__ import annotations

import gzip
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from protobuf import Oneof

from sandboxd.envd.rpc.filesystem import filesystem_pb as fpb
from sandboxd.envd.rpc.filesystem.filesystem_connect import FilesystemClientSync
from sandboxd.envd.rpc.process import process_pb as pb
from sandboxd.envd.rpc.process.process_connect import ProcessClientSync

from .conftest import Envd, free_port
from .wire import STREAM_HEADERS, UNARY_HEADERS, chunked, envelope, parse_envelopes


def post(envd: Envd, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{envd.url}{path}", content=body, headers=headers)


def test_unary_success_headers_and_gzip(envd: Envd, tmp_path) -> None:
    r = post(envd, "/filesystem.Filesystem/Stat", json.dumps({"path": str(tmp_path)}).encode(),
             {**UNARY_HEADERS, "accept-encoding": "identity"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json" and r.headers["content-encoding"] == "identity"
    assert r.headers["vary"] == "Accept-Encoding"
    assert r.json()["entry"]["type"] == "FILE_TYPE_DIRECTORY"
    # a gzipped request, and a gzipped answer when asked for (as connectrpc, gzip is served)
    body = gzip.compress(json.dumps({"path": str(tmp_path)}).encode())
    with httpx.Client() as c:
        r = c.post(f"{envd.url}/filesystem.Filesystem/Stat", content=body,
                   headers={**UNARY_HEADERS, "content-encoding": "gzip", "accept-encoding": "br, gzip"})
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert r.json()["entry"]["path"] == str(tmp_path)
    r = post(envd, "/filesystem.Filesystem/Stat", b"{}", {**UNARY_HEADERS, "content-encoding": "zstd"})
    assert r.status_code == 501 and r.json() == {
        "code": "unimplemented", "message": "unknown compression: 'zstd': supported encodings are gzip, identity"}


def test_unary_errors_and_refusals(envd: Envd) -> None:
    r = post(envd, "/filesystem.Filesystem/Stat", b"{not json", UNARY_HEADERS)
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = post(envd, "/filesystem.Filesystem/Stat", b"", UNARY_HEADERS)
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = post(envd, "/filesystem.Filesystem/Stat", b'{"path": 5}', UNARY_HEADERS)
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = post(envd, "/filesystem.Filesystem/Stat", b'{"path": "/", "someday": [1]}', UNARY_HEADERS)
    assert r.status_code == 200  # unknown fields are ignored
    r = post(envd, "/filesystem.Filesystem/Nope", b"{}", UNARY_HEADERS)
    assert r.status_code == 404 and r.content == b""
    r = httpx.get(f"{envd.url}/filesystem.Filesystem/Stat", params={"message": "{}", "encoding": "json"})
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""
    r = post(envd, "/filesystem.Filesystem/Stat", b"{}", {**UNARY_HEADERS, "content-type": "application/xml"})
    assert r.status_code == 415 and r.content == b""
    r = post(envd, "/filesystem.Filesystem/Stat", b"{}", {**UNARY_HEADERS, "connect-protocol-version": "2"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = post(envd, "/filesystem.Filesystem/Stat", b"{}", {**UNARY_HEADERS, "connect-timeout-ms": "12345678901"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = post(envd, "/filesystem.Filesystem/Stat", b"{}", {**UNARY_HEADERS, "connect-timeout-ms": "soon"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = post(envd, "/filesystem.Filesystem/Stat", b'{"path": "/nope/nothing"}', UNARY_HEADERS)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert r.headers["content-type"] == "application/json"
    # a unary method called as a stream, and a stream as unary: another codec to connectrpc
    r = post(envd, "/filesystem.Filesystem/Stat", envelope({}), STREAM_HEADERS)
    assert r.status_code == 415
    r = post(envd, "/process.Process/Start", b"{}", UNARY_HEADERS)
    assert r.status_code == 415


def test_stream_request_framing(envd: Envd) -> None:
    def start(frames: list[bytes]) -> list[tuple[int, dict]]:
        r = post(envd, "/process.Process/Start", b"", STREAM_HEADERS) if not frames else httpx.post(
            f"{envd.url}/process.Process/Start", content=chunked(frames), headers=STREAM_HEADERS)
        assert r.status_code == 200 and r.headers["content-type"] == "application/connect+json"
        assert r.headers["connect-content-encoding"] == "identity"
        return parse_envelopes(r.content)

    assert start([]) == [(2, {"error": {"code": "unimplemented", "message": "unary request has zero messages"}})]
    two = start([envelope({"process": {"cmd": "/bin/true"}}), envelope({"process": {"cmd": "/bin/true"}})])
    assert two == [(2, {"error": {"code": "unimplemented", "message": "unary request has multiple messages"}})]
    compressed = start([envelope({"process": {"cmd": "/bin/true"}}, flags=1)])
    assert compressed[-1][1]["error"]["code"] == "internal"
    # an envelope split across chunks, byte by byte
    frame = envelope({"process": {"cmd": "/bin/echo", "args": ["split"]}})
    frames = start([frame[i : i + 1] for i in range(len(frame))])
    assert frames[-1] == (2, {})
    assert any(f.get("event", {}).get("data") for _, f in frames)


def test_stream_gzip_both_ways(envd: Envd) -> None:
    data = gzip.compress(json.dumps({"process": {"cmd": "/bin/echo", "args": ["zipped"]}}).encode())
    frame = bytes([1]) + len(data).to_bytes(4, "big") + data
    headers = {**STREAM_HEADERS, "connect-content-encoding": "gzip", "connect-accept-encoding": "gzip"}
    r = httpx.post(f"{envd.url}/process.Process/Start", content=chunked([frame]), headers=headers)
    assert r.status_code == 200 and r.headers["connect-content-encoding"] == "gzip"
    body, out = r.content, []
    while body:
        flags, length = body[0], int.from_bytes(body[1:5], "big")
        assert flags & 1
        out.append((flags, json.loads(gzip.decompress(body[5 : 5 + length]))))
        body = body[5 + length :]
    assert out[-1] == (3, {})
    assert {"event": {"data": {"stdout": "emlwcGVkCg=="}}} in [m for _, m in out]


def test_client_stream_answers_one_message(envd: Envd) -> None:
    r = httpx.post(f"{envd.url}/process.Process/StreamInput", content=chunked([envelope({"keepalive": {}})]),
                   headers=STREAM_HEADERS)
    assert parse_envelopes(r.content) == [(0, {}), (2, {})]
    r = httpx.post(f"{envd.url}/process.Process/StreamInput",
                   content=chunked([envelope({"data": {"input": {"stdin": "YQ=="}}})]), headers=STREAM_HEADERS)
    assert parse_envelopes(r.content) == [
        (2, {"error": {"code": "invalid_argument", "message": "first message must be a start event"}})]


def _binary_clients(url: str) -> tuple[ProcessClientSync, FilesystemClientSync]:
    """The generated clients with their default codec: binary protobuf."""
    return (ProcessClientSync(url, send_compression=None, accept_compression=()),
            FilesystemClientSync(url, send_compression=None, accept_compression=()))


@pytest.fixture(scope="module")
def importtime_envd() -> Iterator[tuple[Envd, subprocess.Popen[bytes]]]:
    """envd started as in a sandbox, under ``-X importtime`` (its imports on stderr)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "sandboxd.envd", "--host", "127.0.0.1",
                             "--port", str(port)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, "envd exited"
            try:
                if httpx.get(f"{url}/health", timeout=0.5).status_code == 204:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "envd did not become healthy"
            time.sleep(0.05)
        yield Envd(url, port, proc), proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _stderr_so_far(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stderr is not None
    out = b""
    while select.select([proc.stderr], [], [], 0.2)[0]:
        chunk = os.read(proc.stderr.fileno(), 1 << 16)
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


def _imported(importtime: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in importtime.splitlines() if line.startswith("import time:")}


def test_start_and_json_rpcs_import_neither_protobuf_nor_connectrpc(importtime_envd, tmp_path) -> None:
    envd, proc = importtime_envd
    r = post(envd, "/filesystem.Filesystem/Stat", json.dumps({"path": str(tmp_path)}).encode(), UNARY_HEADERS)
    assert r.status_code == 200
    r = httpx.post(f"{envd.url}/process.Process/Start", headers=STREAM_HEADERS,
                   content=chunked([envelope({"process": {"cmd": "/bin/echo", "args": ["hi"]}})]))
    assert parse_envelopes(r.content)[-1] == (2, {})
    before = _stderr_so_far(proc)
    imported = _imported(before)
    assert "sandboxd.envd.app" in imported and "sandboxd.envd.connect" in imported
    loaded = sorted(m for m in imported if m.split(".")[0] in ("protobuf", "protobuf_ext", "connectrpc", "pyqwest"))
    assert loaded == []

    # a binary request: protobuf-py and connectrpc are loaded now, and it is answered
    _, files = _binary_clients(envd.url)
    entry = files.stat(fpb.StatRequest(path=str(tmp_path))).entry
    assert entry.type == fpb.FileType.DIRECTORY and entry.path == str(tmp_path)
    after = _imported(_stderr_so_far(proc))
    assert "protobuf" in after and "sandboxd.envd.rpc_binary" in after
    assert "pyqwest" not in after  # the client half stays out (envd/lean.py)


def test_binary_rpcs_answered(importtime_envd, tmp_path) -> None:
    envd, _ = importtime_envd
    process, files = _binary_clients(envd.url)
    with pytest.raises(Exception) as ei:
        files.stat(fpb.StatRequest(path=str(tmp_path / "nope")))
    assert getattr(ei.value, "code", None) is not None and ei.value.code.value == "not_found"  # type: ignore[attr-defined]
    stream = process.start(pb.StartRequest(process=pb.ProcessConfig(cmd="/bin/echo", args=["binary"])))
    got = list(stream)
    assert got[0].event.event.field == "start"
    out = b"".join(m.event.event.value.output.value for m in got if m.event.event.field == "data")
    assert out == b"binary\n"
    assert got[-1].event.event.field == "end" and got[-1].event.event.value.exited
    # a client stream in binary, then a unary one on the running process
    stream = process.start(pb.StartRequest(process=pb.ProcessConfig(cmd="/bin/cat"), stdin=True))
    pid = next(stream).event.event.value.pid
    selector = pb.ProcessSelector(selector=Oneof("pid", pid))
    process.stream_input(iter([
        pb.StreamInputRequest(event=Oneof("start", pb.StreamInputRequest.StartEvent(process=selector))),
        pb.StreamInputRequest(event=Oneof("data", pb.StreamInputRequest.DataEvent(
            input=pb.ProcessInput(input=Oneof("stdin", b"piped\n"))))),
    ]))
    process.close_stdin(pb.CloseStdinRequest(process=selector))
    out = b"".join(m.event.event.value.output.value for m in stream if m.event.event.field == "data")
    assert out == b"piped\n"


def test_grpc_web_answered(importtime_envd, tmp_path) -> None:
    envd, _ = importtime_envd
    data = fpb.StatRequest(path=str(tmp_path)).to_binary()
    r = httpx.post(f"{envd.url}/filesystem.Filesystem/Stat", content=b"\x00" + len(data).to_bytes(4, "big") + data,
                   headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/grpc-web")
    length = int.from_bytes(r.content[1:5], "big")
    entry = fpb.StatResponse.from_binary(r.content[5 : 5 + length]).entry
    assert entry.path == str(tmp_path) and entry.type == fpb.FileType.DIRECTORY
    assert b"grpc-status:0" in r.content[5 + length :].replace(b" ", b"")
