"""Plain message classes with the proto3 JSON mapping: what envd's RPCs carry on the SDKs' wire.

The SDKs speak Connect with JSON only, and protobuf-py builds every descriptor (descriptor.proto's
own included) at import: ~145 ms of envd's start under gVisor and ~3.6 MiB of its heap, for two
small .proto files. The messages of ``process.proto`` and ``filesystem.proto``
(:mod:`.process_messages`, :mod:`.filesystem_messages`) are declared here as plain classes, one
:func:`field` per proto field, in the .proto's order, and read and written with the canonical
proto3 JSON mapping, exactly as protobuf-py's ``to_json()`` / ``from_json(ignore_unknown_fields=
True)`` do (tests/envd/test_messages.py compares them, message by message):

- out: lowerCamelCase names, fields at their default omitted (a oneof member or an ``optional``
  field is written whenever set), int64/uint64 as strings, bytes as standard base64, enums by
  name (an unknown number as the number), google.protobuf.Timestamp as RFC 3339 with ``Z``;
- in: the JSON name or the proto name, integers as numbers or strings (``"1e3"`` too, never
  with spaces), bytes as standard or URL-safe base64 with or without padding, enums by name or
  number (an unknown one leaves the field unset, as protobuf-py does when ignoring unknown
  fields), ``null`` as the field's default, unknown fields ignored. Anything else raises
  ``TypeError``/``ValueError`` (the Connect layer answers ``invalid_argument``).

Binary protobuf and gRPC go through protobuf-py, loaded only when such a request arrives
(:mod:`.rpc_binary`), converting through this same JSON.
"""

from __future__ import annotations

import json
from base64 import b64decode, b64encode
from typing import Any, ClassVar, TypeVar

M = TypeVar("M", bound="Message")

# scalar kinds
STRING, BOOL, UINT32, INT32, INT64, UINT64, BYTES, ENUM, MESSAGE = range(9)
_INT_RANGE = {
    UINT32: (0, 2**32, "uint32"),
    INT32: (-(2**31), 2**31, "int32"),
    INT64: (-(2**63), 2**63, "int64"),
    UINT64: (0, 2**64, "uint64"),
}
# labels
IMPLICIT, OPTIONAL, REPEATED, MAP, ONEOF = range(5)


class Enum:
    """A proto enum's names and numbers (the values themselves are plain ints)."""

    def __init__(self, type_name: str, values: dict[str, int]) -> None:
        self.type_name = type_name
        self.by_name = values
        self.by_number = {n: name for name, n in reversed(values.items())}  # first name wins


class Oneof:
    """The member of a oneof that is set: its proto field name and its value."""

    __slots__ = ("field", "value")
    __match_args__ = ("field", "value")

    def __init__(self, field: str, value: Any) -> None:
        self.field = field
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Oneof) and (self.field, self.value) == (other.field, other.value)

    def __hash__(self) -> int:
        return hash(self.field)

    def __repr__(self) -> str:
        return f"Oneof({self.field!r}, {self.value!r})"


class Field:
    """One proto field: its proto name (set by the class), JSON name, kind, type and label."""

    __slots__ = ("json_name", "kind", "label", "members", "name", "owner", "type")

    def __init__(self, kind: int, type_: Any, label: int, members: dict[str, Field] | None = None) -> None:
        self.name = ""
        self.json_name = ""
        self.kind = kind
        self.type = type_
        self.label = label
        self.members = members
        self.owner = ""

    def named(self, name: str) -> Field:
        self.name = name
        head, *rest = name.split("_")
        self.json_name = head + "".join(p[:1].upper() + p[1:] for p in rest)
        return self

    def default(self) -> Any:
        if self.label == REPEATED:
            return []
        if self.label == MAP:
            return {}
        if self.label in (OPTIONAL, ONEOF) or self.kind == MESSAGE:
            return None
        return _ZERO[self.kind]


_ZERO: dict[int, Any] = {STRING: "", BOOL: False, UINT32: 0, INT32: 0, INT64: 0, UINT64: 0, BYTES: b"", ENUM: 0}


def field(kind: int, type_: Any = None, *, label: int = IMPLICIT) -> Any:
    """A field of a :class:`Message` (typed ``Any`` so the class annotation gives its type)."""
    return Field(kind, type_, label)


def oneof(**members: tuple[int, Any]) -> Any:
    """A oneof group: ``name=(kind, type)`` per member, in the .proto's order."""
    return Field(MESSAGE, None, ONEOF, {n: Field(k, t, ONEOF).named(n) for n, (k, t) in members.items()})


class Message:
    """Base of the plain message classes: keyword construction, equality, JSON in and out."""

    _fields: ClassVar[tuple[Field, ...]] = ()
    _by_key: ClassVar[dict[str, Field]] = {}
    _type_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        fields = tuple(f.named(n) for n, f in cls.__dict__.items() if isinstance(f, Field))
        cls._fields = fields
        by_key: dict[str, Field] = {}
        for f in fields:
            for m in f.members.values() if f.members is not None else (f,):
                m.owner = cls._type_name or cls.__qualname__
                if m.label == ONEOF:
                    m.type = (m.type, f.name)  # a member knows its group
                by_key[m.name] = by_key[m.json_name] = m
        cls._by_key = by_key

    def __init__(self, **kwargs: Any) -> None:
        for f in self._fields:
            value = kwargs.pop(f.name, None)
            setattr(self, f.name, f.default() if value is None else value)
        if kwargs:
            raise TypeError(f"{type(self).__qualname__}() got an unexpected keyword argument '{next(iter(kwargs))}'")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, f.name) == getattr(other, f.name) for f in self._fields)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        set_fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self._fields
                               if getattr(self, f.name) != f.default())
        return f"{type(self).__qualname__}({set_fields})"

    # -- JSON out ---------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(self.to_json_value(), separators=(",", ":"), ensure_ascii=False)

    def to_json_value(self) -> Any:
        out: dict[str, Any] = {}
        for f in self._fields:
            value = getattr(self, f.name)
            label = f.label
            if label == IMPLICIT and f.kind != MESSAGE:
                if value:
                    out[f.json_name] = _scalar_out(f, value)
            elif label == ONEOF:
                if value is not None:
                    m = f.members[value.field]  # type: ignore[index]  # a group has members
                    out[m.json_name] = _scalar_out(m, value.value)
            elif label == REPEATED:
                if value:
                    out[f.json_name] = [_scalar_out(f, v) for v in value]
            elif label == MAP:
                if value:
                    out[f.json_name] = {k: _scalar_out(f, v) for k, v in value.items()}
            elif value is not None:
                out[f.json_name] = _scalar_out(f, value)
        return out

    # -- JSON in ----------------------------------------------------------------------------

    @classmethod
    def from_json(cls: type[M], data: str | bytes | bytearray) -> M:
        return cls.from_json_value(json.loads(data, parse_constant=_no_constant))

    @classmethod
    def from_json_value(cls: type[M], data: Any) -> M:
        if not isinstance(data, dict):
            raise TypeError(f"cannot decode {cls._type_name or cls.__qualname__} from JSON: {data}")
        msg = cls()
        by_key = cls._by_key
        for key, value in data.items():
            f = by_key.get(key)
            if f is None:
                continue  # unknown fields are ignored
            label = f.label
            if label == ONEOF:
                _, group = f.type
                if value is None:
                    current = getattr(msg, group)
                    if f.kind in (MESSAGE, ENUM) and current is not None and current.field == f.name:
                        setattr(msg, group, None)
                    continue
                v = _scalar_in(f, value)
                if v is not None:
                    setattr(msg, group, Oneof(f.name, v))
            elif label == REPEATED:
                if value is None:
                    setattr(msg, f.name, [])
                    continue
                if not isinstance(value, list):
                    raise _error(f, f"expected list got {type(value)}", TypeError)
                items = []
                for item in value:
                    if item is None:
                        raise _error(f, "unexpected null value for list item")
                    v = _scalar_in(f, item)
                    if v is not None:
                        items.append(v)
                setattr(msg, f.name, items)
            elif label == MAP:
                if value is None:
                    setattr(msg, f.name, {})
                    continue
                if not isinstance(value, dict):
                    raise _error(f, f"expected dict got {type(value)}", TypeError)
                entries = {}
                for k, item in value.items():
                    if item is None:
                        raise _error(f, "unexpected null value for map value")
                    _check_utf8(f, k)
                    v = _scalar_in(f, item)
                    if v is not None:
                        entries[k] = v
                setattr(msg, f.name, entries)
            elif value is None:
                setattr(msg, f.name, f.default())
            else:
                v = _scalar_in(f, value)
                if v is not None:
                    setattr(msg, f.name, v)
        return msg


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON literal {name}")


def _type_of(f: Field) -> Any:
    return f.type[0] if f.label == ONEOF else f.type


def _scalar_out(f: Field, value: Any) -> Any:
    kind = f.kind
    if kind == MESSAGE:
        return value.to_json_value()
    if kind in (INT64, UINT64):
        return str(value)
    if kind == BYTES:
        return b64encode(value).decode()
    if kind == ENUM:
        name = _type_of(f).by_number.get(value)
        return int(value) if name is None else name
    return value


def _error(f: Field, text: str, kind: type[Exception] = ValueError) -> Exception:
    return kind(f"{text} for field {f.owner}.{f.name}")


def _check_utf8(f: Field, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _error(f, "invalid utf-8 string") from None


def _scalar_in(f: Field, value: Any) -> Any:
    """One JSON value of field ``f``'s kind (a list item, a map value or the field); None when an
    unknown enum value is to be left out."""
    kind = f.kind
    if kind == MESSAGE:
        return _type_of(f).from_json_value(value)
    if kind == STRING:
        if not isinstance(value, str):
            raise _error(f, f"expected string got: {type(value)}", TypeError)
        _check_utf8(f, value)
        return value
    if kind == BOOL:
        if not isinstance(value, bool):
            raise _error(f, f"unexpected json type: {type(value)}", TypeError)
        return value
    if kind == BYTES:
        if not isinstance(value, str):
            raise _error(f, f"expected base64-encoded string got: {type(value)}", TypeError)
        altchars = b"-_" if "-" in value or "_" in value else None
        if padding := len(value) % 4:
            value += (4 - padding) * "="
        try:
            return b64decode(value, altchars=altchars, validate=True)
        except ValueError:
            raise _error(f, "invalid base64 data") from None
    if kind == ENUM:
        enum: Enum = _type_of(f)
        if isinstance(value, int) and not isinstance(value, bool):
            return value if value in enum.by_number else None
        if isinstance(value, str):
            return enum.by_name.get(value)
        raise ValueError(f"cannot decode {enum.type_name} from JSON: {value}")
    low, high, name = _INT_RANGE[kind]
    v = _parse_int(f, value)
    if not low <= v < high:
        raise _error(f, f"value {v} out of range for {name}", OverflowError)
    return v


def _parse_int(f: Field, value: Any) -> int:
    """protobuf-py's reading of a JSON integer: a number, or a string of one, "x.0" and "1e3" too."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        if not value or value.strip() != value:
            raise _error(f, f"invalid integer value: {value}")
        try:
            return int(value, 10)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise _error(f, f"invalid integer value: '{value}'") from None
    else:
        raise _error(f, f"unexpected json type: {type(value)}", TypeError)
    if not number.is_integer():
        raise _error(f, f"expected integer, got non-integer float: {value}")
    return int(number)


# google.protobuf.Timestamp ------------------------------------------------------------------

_TS_MIN = -62135596800  # 0001-01-01T00:00:00Z
_TS_MAX = 253402300799  # 9999-12-31T23:59:59Z


class Timestamp(Message):
    """google.protobuf.Timestamp; its JSON is an RFC 3339 string in UTC (``...Z``)."""

    _type_name = "google.protobuf.Timestamp"
    seconds: int = field(INT64)
    nanos: int = field(INT32)

    def to_json_value(self) -> Any:
        import time

        if not _TS_MIN <= self.seconds <= _TS_MAX:
            raise ValueError("timestamp seconds out of range")
        if not 0 <= self.nanos <= 999_999_999:
            raise ValueError("timestamp nanos out of range")
        t = time.gmtime(self.seconds)
        text = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        if self.nanos == 0:
            return text + "Z"
        frac = f"{self.nanos:09d}"
        if frac[3:] == "000000":
            frac = frac[:3]
        elif frac[6:] == "000":
            frac = frac[:6]
        return f"{text}.{frac}Z"

    @classmethod
    def from_json_value(cls: type[M], data: Any) -> M:
        import re
        from datetime import UTC, datetime, timedelta

        if not isinstance(data, str):
            raise TypeError(f"cannot decode google.protobuf.Timestamp from JSON: {data}")
        bad = "cannot decode google.protobuf.Timestamp from JSON: invalid RFC 3339 string"
        match = re.match(r"^([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]{1,9}))?"
                         r"(Z|(?:[+-][0-9]{2}:[0-9]{2}))$", data)
        if not match:
            raise ValueError(bad)
        nanos = int(match[2].ljust(9, "0")) if match[2] else 0
        try:
            when = datetime.fromisoformat(match[1] + ("+00:00" if match[3] == "Z" else match[3]))
        except ValueError:
            raise ValueError(bad) from None
        if not datetime(1, 1, 1, tzinfo=UTC) <= when <= datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC):
            raise ValueError("cannot decode google.protobuf.Timestamp from JSON: must be from"
                             " 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z inclusive")
        seconds = (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1)
        return cls(seconds=seconds, nanos=nanos)
