"""A minimal synchronous QMP client (QEMU's JSON control socket): enough to stop, inspect and
snapshot VMs. Events arriving between commands are kept in ``events`` and otherwise ignored."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from sandboxd.errors import StartError


class QmpError(StartError):
    pass


class Qmp:
    """``with Qmp(path) as qmp: qmp.execute("query-status")``."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.events: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
            self._file = self._sock.makefile("rb")
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmpError(f"not a QMP greeting: {greeting}")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    @classmethod
    def connect(cls, path: Path, deadline: float, alive: Any = lambda: True) -> Qmp:
        """Retry until QEMU listens (or ``deadline`` passes, or ``alive()`` says it died)."""
        while True:
            try:
                return cls(path)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline or not alive():
                    raise
                time.sleep(0.02)

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QmpError("QMP connection closed")
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
