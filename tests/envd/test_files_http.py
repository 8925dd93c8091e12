"""GET/POST /files: multipart and octet-stream uploads, gzip, ownership, errors, streaming."""

from __future__ import annotations

import gzip
import os
import uuid

import httpx
import pytest

from sandboxd.envd.multipart import MultipartParser, PartData, PartEnd, PartStart

from .conftest import Envd


@pytest.fixture
def tdir(tmp_path):
    os.chmod(tmp_path, 0o777)
    return tmp_path


def test_multipart_single_file_with_path(envd: Envd, tdir) -> None:
    dest = tdir / "sub" / "dir" / "hello.txt"
    r = httpx.post(f"{envd.url}/files", params={"path": str(dest)},
                   files={"file": (str(dest), b"hi there", "text/plain")})
    assert r.status_code == 200, r.text
    assert r.json() == [{"name": "hello.txt", "type": "file", "path": str(dest)}]
    assert dest.read_bytes() == b"hi there"
    r = httpx.get(f"{envd.url}/files", params={"path": str(dest)})
    assert r.status_code == 200 and r.content == b"hi there"
    assert r.headers["content-type"] == "application/octet-stream"


def test_multipart_several_files_without_path(envd: Envd, tdir) -> None:
    a, b = tdir / "a.txt", tdir / "nested" / "b.bin"
    payload = os.urandom(100_000)
    r = httpx.post(f"{envd.url}/files", files=[("file", (str(a), b"A")), ("file", (str(b), payload))])
    assert r.status_code == 200, r.text
    assert [x["path"] for x in r.json()] == [str(a), str(b)]
    assert a.read_bytes() == b"A" and b.read_bytes() == payload


def test_octet_stream_chunked_and_gzip(envd: Envd, tdir) -> None:
    dest = tdir / "o.bin"
    data = os.urandom(200_000)

    def gen():
        for i in range(0, len(data), 7000):
            yield data[i : i + 7000]

    r = httpx.post(f"{envd.url}/files", params={"path": str(dest)}, content=gen(),
                   headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert dest.read_bytes() == data
    text = b"compress me " * 10000
    r = httpx.post(f"{envd.url}/files", params={"path": str(dest)}, content=gzip.compress(text),
                   headers={"content-type": "application/octet-stream", "content-encoding": "gzip"})
    assert r.status_code == 200, r.text
    assert dest.read_bytes() == text  # overwritten, decompressed


def test_upload_owned_by_user_and_relative_to_home(envd: Envd, sandbox_user) -> None:
    name = f"up-{uuid.uuid4().hex}/x.txt"
    r = httpx.post(f"{envd.url}/files", params={"path": name, "username": sandbox_user.pw_name},
                   files={"file": (name, b"mine")})
    assert r.status_code == 200, r.text
    path = os.path.join(sandbox_user.pw_dir, name)
    assert r.json()[0]["path"] == path
    for p in (path, os.path.dirname(path)):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (sandbox_user.pw_uid, sandbox_user.pw_gid)
    r = httpx.get(f"{envd.url}/files", params={"path": name, "username": sandbox_user.pw_name})
    assert r.content == b"mine"


def test_download_errors(envd: Envd, tdir) -> None:
    r = httpx.get(f"{envd.url}/files", params={"path": str(tdir / "missing")})
    assert r.status_code == 404 and r.json()["code"] == 404 and "missing" in r.json()["message"]
    r = httpx.get(f"{envd.url}/files", params={"path": str(tdir)})
    assert r.status_code == 400 and r.json()["code"] == 400
    r = httpx.get(f"{envd.url}/files", params={"path": "/x", "username": "no-such-user"})
    assert r.status_code == 401


def test_upload_onto_directory_is_400(envd: Envd, tdir) -> None:
    r = httpx.post(f"{envd.url}/files", params={"path": str(tdir)}, content=b"x",
                   headers={"content-type": "application/octet-stream"})
    assert r.status_code == 400 and r.json()["code"] == 400


def test_metadata_headers(envd: Envd, tdir) -> None:
    dest = tdir / "meta.txt"
    r = httpx.post(f"{envd.url}/files", params={"path": str(dest)}, content=b"m",
                   headers={"content-type": "application/octet-stream", "X-Metadata-Owner-Team": "blue"})
    assert r.status_code == 200
    assert r.json()[0]["metadata"] == {"owner-team": "blue"}


def _vm_hwm_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_large_files_are_streamed(envd: Envd, tdir) -> None:
    size = 96 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    before = _vm_hwm_kib(envd.proc.pid)

    def gen():
        for _ in range(size // len(block)):
            yield block

    dest = tdir / "big.bin"
    r = httpx.post(f"{envd.url}/files", params={"path": str(dest)}, content=gen(),
                   headers={"content-type": "application/octet-stream"}, timeout=60)
    assert r.status_code == 200, r.text
    assert dest.stat().st_size == size
    total = 0
    with httpx.stream("GET", f"{envd.url}/files", params={"path": str(dest)}, timeout=60) as resp:
        assert resp.headers["content-length"] == str(size)
        for chunk in resp.iter_raw():
            total += len(chunk)
    assert total == size
    grown_mib = (_vm_hwm_kib(envd.proc.pid) - before) / 1024
    assert grown_mib < 40, f"envd peak memory grew by {grown_mib:.0f} MiB for a 96 MiB file"


def test_multipart_parser_byte_by_byte() -> None:
    body = (
        b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/a \\\"q\\\".txt\"\r\n"
        b"Content-Type: text/plain\r\n\r\nline1 --XyZ inline\r\n-\r\n--"
        b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/b\"\r\n\r\n"
        b"\r\n--XyZ--\r\nepilogue"
    )
    p = MultipartParser("XyZ")
    evs = []
    for i in range(len(body)):
        evs.extend(p.feed(body[i : i + 1]))
    assert p.finished
    starts = [e for e in evs if isinstance(e, PartStart)]
    assert [s.filename for s in starts] == ['/a "q".txt', "/b"]
    parts: list[bytes] = []
    for e in evs:
        if isinstance(e, PartStart):
            parts.append(b"")
        elif isinstance(e, PartData):
            parts[-1] += e.data
    assert parts == [b"line1 --XyZ inline\r\n-\r\n--", b""]
    assert sum(isinstance(e, PartEnd) for e in evs) == 2
