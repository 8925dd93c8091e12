"""filesystem.Filesystem on the wire: EntryInfo JSON, depth, and the error codes the SDK keys on."""

from __future__ import annotations

import os
import time

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from sandboxd.envd.rpc.filesystem import filesystem_pb as fpb

from .conftest import Envd
from .wire import STREAM_HEADERS, UNARY_HEADERS, basic_auth, chunked, envelope, filesystem_client, parse_envelopes


def rpc(envd: Envd, method: str, body: dict, user: str | None = None) -> httpx.Response:
    headers = dict(UNARY_HEADERS)
    if user:
        headers["authorization"] = basic_auth(user)
    return httpx.post(f"{envd.url}/filesystem.Filesystem/{method}", json=body, headers=headers)


def test_stat_entry_json(envd: Envd, tmp_path) -> None:
    f = tmp_path / "hello.txt"
    f.write_bytes(b"hi")
    os.chmod(f, 0o640)
    r = rpc(envd, "Stat", {"path": str(f)})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    e = r.json()["entry"]
    assert e["name"] == "hello.txt" and e["type"] == "FILE_TYPE_FILE" and e["path"] == str(f)
    assert e["size"] == "2"  # int64 as a string
    assert e["mode"] == 0o640 and e["permissions"] == "-rw-r-----"
    assert e["owner"] == "root" and e["group"] == "root"
    assert e["modifiedTime"].endswith("Z")


def test_stat_missing_is_not_found(envd: Envd, tmp_path) -> None:
    r = rpc(envd, "Stat", {"path": str(tmp_path / "nope")})
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_symlink_entry(envd: Envd, tmp_path) -> None:
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "d", tmp_path / "link")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    e = rpc(envd, "Stat", {"path": str(tmp_path / "link")}).json()["entry"]
    assert e["type"] == "FILE_TYPE_DIRECTORY" and e["isSymlink"] is True
    assert e["symlinkTarget"] == str(tmp_path / "d")
    e = rpc(envd, "Stat", {"path": str(tmp_path / "dangling")}).json()["entry"]
    assert e["type"] == "FILE_TYPE_SYMLINK" and e["isSymlink"] is True


def test_list_dir_depth(envd: Envd, tmp_path) -> None:
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "f.txt").write_text("x")
    (tmp_path / "z.txt").write_text("y")
    names = lambda depth: sorted(  # noqa: E731
        os.path.relpath(e["path"], tmp_path)
        for e in rpc(envd, "ListDir", {"path": str(tmp_path), "depth": depth}).json()["entries"]
    )
    assert names(0) == names(1) == ["a", "z.txt"]
    assert names(2) == ["a", "a/b", "a/f.txt", "z.txt"]
    assert names(5) == ["a", "a/b", "a/b/c", "a/f.txt", "z.txt"]
    for e in rpc(envd, "ListDir", {"path": str(tmp_path), "depth": 5}).json()["entries"]:
        assert e["type"] in ("FILE_TYPE_FILE", "FILE_TYPE_DIRECTORY")


def test_list_dir_errors(envd: Envd, tmp_path) -> None:
    assert rpc(envd, "ListDir", {"path": str(tmp_path / "nope")}).json()["code"] == "not_found"
    (tmp_path / "f").write_text("x")
    assert rpc(envd, "ListDir", {"path": str(tmp_path / "f")}).json()["code"] == "invalid_argument"


def test_make_dir_move_remove(envd: Envd, tmp_path) -> None:
    client = filesystem_client(envd.url)
    d = tmp_path / "x" / "y"
    entry = client.make_dir(fpb.MakeDirRequest(path=str(d))).entry
    assert entry.type == fpb.FileType.DIRECTORY and d.is_dir()
    with pytest.raises(ConnectError) as ei:
        client.make_dir(fpb.MakeDirRequest(path=str(d)))
    assert ei.value.code == Code.ALREADY_EXISTS
    (d / "f.txt").write_text("data")
    moved = client.move(fpb.MoveRequest(source=str(d / "f.txt"), destination=str(tmp_path / "new" / "g.txt"))).entry
    assert moved.path == str(tmp_path / "new" / "g.txt") and moved.name == "g.txt" and moved.size == 4
    with pytest.raises(ConnectError) as ei:
        client.move(fpb.MoveRequest(source=str(d / "f.txt"), destination=str(tmp_path / "h")))
    assert ei.value.code == Code.NOT_FOUND
    client.remove(fpb.RemoveRequest(path=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()
    client.remove(fpb.RemoveRequest(path=str(tmp_path / "x")))  # gone already: fine (E2B: os.RemoveAll)


def test_make_dir_owned_by_user_relative_to_home(envd: Envd, sandbox_user) -> None:
    r = rpc(envd, "MakeDir", {"path": "made/by/rpc"}, user=sandbox_user.pw_name)
    assert r.status_code == 200, r.text
    path = os.path.join(sandbox_user.pw_dir, "made/by/rpc")
    assert r.json()["entry"]["path"] == path and r.json()["entry"]["owner"] == sandbox_user.pw_name
    assert os.stat(os.path.join(sandbox_user.pw_dir, "made")).st_uid == sandbox_user.pw_uid
    rpc(envd, "Remove", {"path": "made"}, user=sandbox_user.pw_name)


def _poll(envd: Envd, wid: str, want: int) -> list[dict]:
    got: list[dict] = []
    deadline = time.monotonic() + 5
    while len(got) < want and time.monotonic() < deadline:
        got += rpc(envd, "GetWatcherEvents", {"watcherId": wid}).json().get("events", [])
        time.sleep(0.05)
    return got


def test_polled_watcher(envd: Envd, tmp_path) -> None:
    r = rpc(envd, "CreateWatcher", {"path": str(tmp_path), "recursive": True, "includeEntry": True})
    assert r.status_code == 200, r.text
    wid = r.json()["watcherId"]
    (tmp_path / "sub").mkdir()
    time.sleep(0.1)  # the new directory's watch is added when its create event is read
    (tmp_path / "sub" / "f.txt").write_text("x")
    os.rename(tmp_path / "sub" / "f.txt", tmp_path / "g.txt")
    os.chmod(tmp_path / "g.txt", 0o600)
    os.unlink(tmp_path / "g.txt")
    events = _poll(envd, wid, 7)
    seen = [(e["name"], e["type"]) for e in events]
    for expected in [("sub", "EVENT_TYPE_CREATE"), ("sub/f.txt", "EVENT_TYPE_CREATE"),
                     ("sub/f.txt", "EVENT_TYPE_WRITE"), ("sub/f.txt", "EVENT_TYPE_RENAME"),
                     ("g.txt", "EVENT_TYPE_CREATE"), ("g.txt", "EVENT_TYPE_CHMOD"), ("g.txt", "EVENT_TYPE_REMOVE")]:
        assert expected in seen, seen
    created = next(e for e in events if e["name"] == "sub")
    assert created["entry"]["type"] == "FILE_TYPE_DIRECTORY"
    assert rpc(envd, "RemoveWatcher", {"watcherId": wid}).status_code == 200
    assert rpc(envd, "GetWatcherEvents", {"watcherId": wid}).json()["code"] == "not_found"
    assert rpc(envd, "CreateWatcher", {"path": str(tmp_path / "nope")}).json()["code"] == "not_found"


def test_watch_dir_stream(envd: Envd, tmp_path) -> None:
    body = chunked([envelope({"path": str(tmp_path)})])
    headers = {**STREAM_HEADERS, "keepalive-ping-interval": "1", "connect-timeout-ms": "2500"}
    frames: list[tuple[int, dict]] = []
    with httpx.Client() as c, c.stream("POST", f"{envd.url}/filesystem.Filesystem/WatchDir",
                                       content=body, headers=headers) as r:
        buf = b""
        for part in r.iter_raw():
            buf += part
            if not frames and len(buf) >= 5 + int.from_bytes(buf[1:5], "big"):
                frames = parse_envelopes(buf)
                (tmp_path / "w.txt").write_text("x")
    frames = parse_envelopes(buf)
    msgs = [f for flags, f in frames if flags == 0]
    assert msgs[0] == {"start": {}}
    assert {"filesystem": {"name": "w.txt", "type": "EVENT_TYPE_CREATE"}} in msgs
    assert {"keepalive": {}} in msgs
    assert frames[-1][0] == 2 and frames[-1][1]["error"]["code"] == "deadline_exceeded"
