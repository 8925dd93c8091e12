"""A streaming ``multipart/form-data`` parser: parts are handed on as they arrive.

Why our own: envd depends on nothing but the stdlib, h11 and connectrpc, and uploads can be
large; :mod:`email` would buffer the whole body. Feed it chunks, get events back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 * 1024


class MultipartError(ValueError):
    """The body is not valid multipart."""


@dataclass(frozen=True)
class PartStart:
    name: str | None
    filename: str | None
    headers: dict[str, str]


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


MultipartEvent = PartStart | PartData | PartEnd

_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def parse_options(value: str) -> tuple[str, dict[str, str]]:
    """``form-data; name="file"; filename="/a b.txt"`` → ("form-data", {name, filename})."""
    main, _, _ = value.partition(";")
    params: dict[str, str] = {}
    for key, raw in _PARAM.findall(value):
        raw = raw.strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[key.lower()] = raw
    return main.strip().lower(), params


def boundary_of(content_type: str) -> str | None:
    """The boundary of a ``multipart/form-data`` Content-Type, else None."""
    kind, params = parse_options(content_type)
    if kind != "multipart/form-data":
        return None
    return params.get("boundary") or None


class MultipartParser:
    """Incremental parser; :meth:`feed` returns the events a chunk completes."""

    def __init__(self, boundary: str) -> None:
        self._delim = b"\r\n--" + boundary.encode("latin-1")
        self._buf = b"\r\n"  # lets the first boundary match the same delimiter as the others
        self._state = "preamble"

    @property
    def finished(self) -> bool:
        return self._state == "done"

    def feed(self, chunk: bytes) -> list[MultipartEvent]:
        self._buf += chunk
        events: list[MultipartEvent] = []
        while True:
            if self._state == "preamble":
                i = self._buf.find(self._delim)
                if i < 0:
                    self._buf = self._buf[-len(self._delim) :]
                    return events
                self._buf = self._buf[i + len(self._delim) :]
                self._state = "after_delim"
            elif self._state == "after_delim":
                if len(self._buf) < 2:
                    return events
                if self._buf.startswith(b"--"):
                    self._state = "done"
                    self._buf = b""
                    return events
                j = self._buf.find(b"\r\n")
                if j < 0:  # transport padding before CRLF is allowed; wait for the CRLF
                    if len(self._buf) > 1024:
                        raise MultipartError("malformed boundary line")
                    return events
                self._buf = self._buf[j + 2 :]
                self._state = "headers"
            elif self._state == "headers":
                if self._buf.startswith(b"\r\n"):
                    end, raw = 2, b""
                else:
                    k = self._buf.find(b"\r\n\r\n")
                    if k < 0:
                        if len(self._buf) > MAX_HEADER_BYTES:
                            raise MultipartError("part headers too large")
                        return events
                    end, raw = k + 4, self._buf[:k]
                self._buf = self._buf[end:]
                events.append(_part_start(raw))
                self._state = "body"
            elif self._state == "body":
                i = self._buf.find(self._delim)
                if i < 0:
                    keep = len(self._delim) - 1
                    if len(self._buf) > keep:
                        events.append(PartData(self._buf[:-keep]))
                        self._buf = self._buf[-keep:]
                    return events
                if i:
                    events.append(PartData(self._buf[:i]))
                events.append(PartEnd())
                self._buf = self._buf[i + len(self._delim) :]
                self._state = "after_delim"
            else:  # done: ignore the epilogue
                self._buf = b""
                return events


def _part_start(raw: bytes) -> PartStart:
    headers: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        key, sep, value = line.partition(b":")
        if not sep:
            raise MultipartError("malformed part header")
        headers[key.strip().decode("latin-1").lower()] = value.strip().decode("utf-8", "replace")
    _, params = parse_options(headers.get("content-disposition", ""))
    return PartStart(params.get("name"), params.get("filename"), headers)
