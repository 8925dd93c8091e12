"""envd's plain messages (envd/messages.py) against protobuf-py's own JSON mapping, message by message.

For every message of process.proto and filesystem.proto, each field is read from many JSON values
(edge values and wrong ones) by both, and what each writes back must be the same bytes; a value
one refuses the other must refuse too. Nothing here is hand-written expected JSON: protobuf-py
(the generated ``rpc/*_pb.py``) is the reference.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from protobuf import Oneof as PbOneof
from protobuf.wkt import Timestamp as PbTimestamp

from sandboxd.envd import filesystem_messages, process_messages
from sandboxd.envd.messages import (
    BOOL,
    BYTES,
    ENUM,
    INT32,
    INT64,
    MAP,
    MESSAGE,
    ONEOF,
    REPEATED,
    STRING,
    UINT32,
    Field,
    Message,
    Oneof,
    Timestamp,
)
from sandboxd.envd.rpc.filesystem import filesystem_pb
from sandboxd.envd.rpc.process import process_pb

LEAN: dict[str, tuple[type[Message], Any]] = {}
for _name, _cls in process_messages.ALL.items():
    LEAN[f"process.{_name}"] = (_cls, process_pb)
for _name, _cls in filesystem_messages.ALL.items():
    LEAN[f"filesystem.{_name}"] = (_cls, filesystem_pb)


def pb_class(full_name: str) -> Any:
    _, module = LEAN[full_name]
    obj = module
    for part in full_name.split(".", 1)[1].split("."):
        obj = getattr(obj, part)
    return obj


SCALARS: dict[int, list[Any]] = {
    STRING: ["", "x", "héllo ✓ 𝄞 \u0000 \"q\" \\", "\ud800", 5, None],
    BOOL: [True, False, None, 0, "true"],
    UINT32: [0, 1, 4294967295, 4294967296, -1, "17", "1e3", "2.0", 2.5, " 1", "", "0x10", "1_0", "+5", 1e3, True, None],
    INT32: [0, -5, 2147483647, -2147483648, 2147483648, "-17", "-1e2", 3.5, None],
    INT64: [0, 2**53 + 1, -(2**53) - 1, 9223372036854775807, -9223372036854775808, 2**63, "9007199254740993",
            "-9223372036854775808", "1e18", "1.5", -1, None],
    BYTES: ["", "YQ==", "YQ", "-_8=", "+/8=", "-_8", "AA==", "!!", "YQ=", "Y Q==", 5, None],
    ENUM: [],  # from the enum itself
}


def enum_values(enum: Any) -> list[Any]:
    names = list(enum.by_name)
    numbers = list(enum.by_number)
    return [*names, *numbers, 7, -3, "NOT_A_NAME", True, 1.0, None]


def timestamp_values() -> list[Any]:
    return ["2023-11-14T22:13:20Z", "2023-11-14T22:13:20.000005Z", "2023-11-14T22:13:20.5Z",
            "2023-11-14T22:13:20.123456789Z", "1970-01-01T00:00:00Z", "1969-12-31T23:59:59.999Z",
            "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2023-11-14T22:13:20+01:00",
            "2023-11-14T22:13:20-05:30", "2023-11-14 22:13:20Z", "2023-13-14T22:13:20Z", "bad", 5, None]


def values_for(f: Field, depth: int = 0) -> list[Any]:
    """JSON values to try for one element of field ``f``."""
    typ = f.type[0] if f.label == ONEOF else f.type
    if f.kind == MESSAGE:
        if typ is Timestamp:
            return timestamp_values()
        return [{}, sample(typ, depth + 1), None, [], "x", {"unknownField": 1}]
    if f.kind == ENUM:
        return enum_values(typ)
    return SCALARS[f.kind]


def sample(cls: type[Message], depth: int = 0) -> dict[str, Any]:
    """A JSON object with every field set to a typical value (the first member of a oneof)."""
    out: dict[str, Any] = {}
    for f in cls._fields:
        if f.label == ONEOF:
            assert f.members is not None
            m = next(iter(f.members.values()))
            out[m.json_name] = typical(m, depth)
        elif f.label == REPEATED:
            out[f.json_name] = [typical(f, depth), typical(f, depth)]
        elif f.label == MAP:
            out[f.json_name] = {"a": "1", "ü ✓": "𝄞"}
        else:
            out[f.json_name] = typical(f, depth)
    return out


def typical(f: Field, depth: int) -> Any:
    typ = f.type[0] if f.label == ONEOF else f.type
    if f.kind == MESSAGE:
        return "2024-02-29T12:00:00.25Z" if typ is Timestamp else ({} if depth > 3 else sample(typ, depth + 1))
    if f.kind == ENUM:
        return list(typ.by_name)[-1]
    return {STRING: "text", BOOL: True, UINT32: 42, INT32: -42, INT64: "1234567890123", BYTES: "aGk="}[f.kind]


def variants(cls: type[Message]) -> list[Any]:
    """JSON documents for ``cls``: the sample, then each field replaced by each of its values,
    under its JSON name and its proto name, plus the whole-document oddities."""
    base = sample(cls)
    docs: list[Any] = [base, {}, {"unknown": [1, {"x": None}]}, [], None, "x", 3]
    for f in cls._fields:
        members = list(f.members.values()) if f.members is not None else [f]
        for m in members:
            rest = {k: v for k, v in base.items() if k not in {x.json_name for x in members}}
            for v in values_for(m):
                if m.label == REPEATED:
                    vs: list[Any] = [[v], [v, v], [], None, v]
                elif m.label == MAP:
                    vs = [{"k": v}, {}, None, [v]] if m.kind == STRING else [{"k": v}]
                else:
                    vs = [v]
                for value in vs:
                    docs.append({**rest, m.json_name: value})
                    if m.name != m.json_name:
                        docs.append({**rest, m.name: value})
                        docs.append({**rest, m.json_name: value, m.name: typical(m, 0)})
        if f.members is not None and len(members) > 1:  # two members of one oneof, in both orders
            a, b = members[0], members[1]
            docs.append({a.json_name: typical(a, 0), b.json_name: typical(b, 0)})
            docs.append({b.json_name: typical(b, 0), a.json_name: typical(a, 0)})
            docs.append({a.json_name: typical(a, 0), b.json_name: None})
            docs.append({a.json_name: None, b.json_name: typical(b, 0)})
    return docs


def outcome(read: Any, write: Any, text: str) -> tuple[str, str]:
    try:
        message = read(text)
    except Exception as e:  # noqa: BLE001 - compared, not raised
        return "read error", type(e).__name__
    try:
        return "ok", write(message)
    except Exception as e:  # noqa: BLE001
        return "write error", type(e).__name__


@pytest.mark.parametrize("name", sorted(LEAN))
def test_json_mapping_matches_protobuf_py(name: str) -> None:
    lean, _ = LEAN[name]
    pb = pb_class(name)
    checked = 0
    for doc in variants(lean):
        text = json.dumps(doc, ensure_ascii=bool(checked % 2))
        want = outcome(lambda t: pb.from_json(t, ignore_unknown_fields=True), lambda m: m.to_json(), text)
        got = outcome(lean.from_json, lambda m: m.to_json(), text)
        assert got[0] == want[0], (text, got, want)
        if want[0] == "ok":
            assert got[1] == want[1], text
            again = lean.from_json(got[1])
            assert again.to_json() == got[1] and again == lean.from_json(text), text
        checked += 1
    assert checked > 5
    print(name, checked)


def test_malformed_json_is_refused_like_protobuf_py() -> None:
    for text in ["", "{", '{"path": }', '{"path": NaN}', '{"depth": Infinity}', "\xff", '{"path": "a"} x']:
        with pytest.raises(Exception):  # noqa: B017 - any error; the RPC layer makes it invalid_argument
            filesystem_pb.ListDirRequest.from_json(text, ignore_unknown_fields=True)
        with pytest.raises((ValueError, TypeError)):
            filesystem_messages.ListDirRequest.from_json(text)


def test_written_values_match_protobuf_py() -> None:
    """What envd builds (not parsed): edge values written the same."""
    fm, pm = filesystem_messages, process_messages
    cases: list[tuple[Message, Any]] = [
        (fm.EntryInfo(name="ü", type=7, size=2**62, mode=0o755, symlink_target="", is_symlink=True,
                      modified_time=Timestamp(seconds=-1, nanos=1), metadata={"k": "v"}),
         filesystem_pb.EntryInfo(name="ü", type=7, size=2**62, mode=0o755, symlink_target="", is_symlink=True,
                                 modified_time=PbTimestamp(seconds=-1, nanos=1),
                                 metadata={"k": "v"})),
        (fm.EntryInfo(size=-(2**63)), filesystem_pb.EntryInfo(size=-(2**63))),
        (pm.ProcessEvent(event=Oneof("data", pm.ProcessEvent.DataEvent(output=Oneof("stdout", b"")))),
         process_pb.ProcessEvent(event=PbOneof("data", process_pb.ProcessEvent.DataEvent(
             output=PbOneof("stdout", b""))))),
        (pm.ProcessEvent(event=Oneof("data", pm.ProcessEvent.DataEvent(output=Oneof("pty", bytes(range(256)))))),
         process_pb.ProcessEvent(event=PbOneof("data", process_pb.ProcessEvent.DataEvent(
             output=PbOneof("pty", bytes(range(256))))))),
        (pm.ProcessEvent(event=Oneof("end", pm.ProcessEvent.EndEvent(exit_code=-1, error=""))),
         process_pb.ProcessEvent(event=PbOneof("end", process_pb.ProcessEvent.EndEvent(exit_code=-1, error="")))),
        (pm.ProcessEvent(event=Oneof("keepalive", pm.ProcessEvent.KeepAlive())),
         process_pb.ProcessEvent(event=PbOneof("keepalive", process_pb.ProcessEvent.KeepAlive()))),
        (pm.SendSignalRequest(signal=7), process_pb.SendSignalRequest(signal=7)),
        (pm.ProcessSelector(selector=Oneof("pid", 0)), process_pb.ProcessSelector(selector=PbOneof("pid", 0))),
        (pm.StartRequest(stdin=False, tag=""), process_pb.StartRequest(stdin=False, tag="")),
    ]
    for lean, pb in cases:
        assert lean.to_json() == pb.to_json()
