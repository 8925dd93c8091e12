"""The ``sudo`` command where setuid cannot work (gVisor): see :mod:`sandboxd.envd.sudo_broker`.

Run as ``python -m sandboxd.envd.sudo_client ARGS...`` by the wrapper the runtime puts on PATH.
It passes its stdin/stdout/stderr to envd, relays signals, and exits with the command's code.
"""

from __future__ import annotations

import array
import json
import os
import secrets
import signal
import socket
import struct
import sys

from sandboxd.envd.contract import SUDO
from sandboxd.envd.sudo_broker import PROOF_DIR, SOCKET_PATH

RELAYED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _std_fds() -> list[int]:
    """0, 1, 2 — replaced by /dev/null where the caller closed them (they must be passable)."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def main(argv: list[str]) -> int:
    if os.getuid() == 0:
        os.execv(SUDO, ["sudo", *argv])
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(SOCKET_PATH)
    except OSError as exc:
        print(f"sudo: cannot reach envd's sudo service at {SOCKET_PATH}: {exc}", file=sys.stderr)
        return 1
    proof = secrets.token_hex(16)  # a file only we can have created proves our uid to envd
    os.close(os.open(os.path.join(PROOF_DIR, proof), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    payload = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "proof": proof}).encode()
    conn.sendmsg([struct.pack("!I", len(payload)) + payload],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", _std_fds()))])
    for sig in RELAYED_SIGNALS:
        signal.signal(sig, lambda n, _f: conn.sendall(f"S {n}\n".encode()))
    buf = b""
    while b"\n" not in buf:
        chunk = conn.recv(64)
        if not chunk:
            print("sudo: envd closed the connection", file=sys.stderr)
            return 1
        buf += chunk
    line = buf.split(b"\n", 1)[0].split()
    return int(line[1]) if len(line) == 2 and line[0] == b"E" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
