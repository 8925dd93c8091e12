"""``sudo`` where setuid cannot work: envd (root) runs the real sudo on the caller's behalf.

gVisor always sets no_new_privs on every process, so the setuid bit of /usr/bin/sudo has no
effect and E2B's passwordless ``sudo`` for ``user`` would fail. When envd sees no_new_privs on
itself, it listens on :data:`SOCKET_PATH`; the ``sudo`` wrapper the runtime puts first on PATH
(:mod:`sandboxd.envd.sudo_client`) sends its argv, environment, cwd and its stdin/stdout/stderr
file descriptors (SCM_RIGHTS). envd checks the caller against sudoers (``sudo -l -U``), starts
``/usr/bin/sudo`` as root with those descriptors, forwards signals the client relays, and sends
back the exit code. If the client goes away, the command's process group is killed.

Wire format: client → envd: 4-byte big-endian length + JSON ``{argv, env, cwd, proof}`` (with the fds
attached), then lines ``S <signo>``; envd → client: one line ``E <exit code>``.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import logging
import os
import pwd
import signal
import socket
import stat
import struct
import subprocess
import threading
from typing import Any

from sandboxd.envd.contract import SUDO

log = logging.getLogger("envd.sudo")

SOCKET_PATH = "/run/sandboxd/sudo.sock"
PROOF_DIR = "/run/sandboxd/sudo-proof"
PR_GET_NO_NEW_PRIVS = 39
_MAX_REQUEST = 4 * 1024 * 1024


def setuid_blocked() -> bool:
    """True when this process has no_new_privs (always the case under gVisor)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1
    except (OSError, AttributeError):
        return False


class SudoBroker:
    """A unix-socket server on daemon threads (fd passing needs recvmsg, which asyncio lacks)."""

    def __init__(self, path: str = SOCKET_PATH, sudo: str = SUDO) -> None:
        self.path = path
        self.sudo = sudo
        self._allowed: dict[int, bool] = {}

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        os.makedirs(PROOF_DIR, exist_ok=True)
        os.chmod(PROOF_DIR, 0o1733)  # anyone may create, nobody may list; sticky
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self.path)
        os.chmod(self.path, 0o666)
        server.listen(64)
        threading.Thread(target=self._accept_loop, args=(server,), daemon=True, name="sudo-broker").start()
        log.info("sudo broker listening on %s (setuid is blocked in this sandbox)", self.path)

    def _accept_loop(self, server: socket.socket) -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            with conn:
                request, fds = _receive_request(conn)
                uid = _proof_uid(request.get("proof"))
                if uid is None or not self._may_sudo(uid):
                    os.write(fds[2], f"sudo: {_name(uid)} is not in the sudoers file.\n".encode())
                    conn.sendall(b"E 1\n")
                    return
                self._run(conn, request, fds)
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            log.warning("sudo request failed: %s", exc)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _may_sudo(self, uid: int) -> bool:
        """Ask sudo itself (as root) whether the caller may run commands; cached per uid."""
        if uid == 0:
            return True
        if uid not in self._allowed:
            check = subprocess.run([self.sudo, "-n", "-l", "-U", _name(uid)], capture_output=True, text=True)
            self._allowed[uid] = check.returncode == 0 and "may run the following" in check.stdout
        return self._allowed[uid]

    def _run(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        argv = [self.sudo, *[str(a) for a in request.get("argv", [])]]
        env = {str(k): str(v) for k, v in dict(request.get("env", {})).items()}
        cwd = str(request.get("cwd") or "/")
        proc = subprocess.Popen(argv, stdin=fds[0], stdout=fds[1], stderr=fds[2], env=env,
                                cwd=cwd if os.path.isdir(cwd) else "/", start_new_session=True)
        for fd in fds:
            os.close(fd)
        fds.clear()
        threading.Thread(target=_relay_signals, args=(conn, proc), daemon=True).start()
        code = proc.wait()
        with contextlib.suppress(OSError):
            conn.sendall(f"E {128 - code if code < 0 else code}\n".encode())


def _receive_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    fds = array.array("i")
    data, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    received = list(fds)
    if len(received) != 3 or len(data) < 4:
        for fd in received:
            os.close(fd)
        raise ValueError("expected a length-prefixed request with 3 file descriptors")
    size = struct.unpack("!I", data[:4])[0]
    if size > _MAX_REQUEST:
        raise ValueError("request too large")
    body = data[4:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ValueError("client closed mid-request")
        body += chunk
    return json.loads(body[:size]), received


def _relay_signals(conn: socket.socket, proc: subprocess.Popen[bytes]) -> None:
    """Forward ``S <signo>`` lines to the command's process group; kill it if the client vanishes."""
    buf = b""
    while proc.poll() is None:
        try:
            chunk = conn.recv(256)
        except OSError:
            chunk = b""
        if not chunk:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            parts = line.split()
            if len(parts) == 2 and parts[0] == b"S" and parts[1].isdigit():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, int(parts[1]))


def _proof_uid(name: object) -> int | None:
    """The caller's uid, proven by the owner of the file it just created in :data:`PROOF_DIR`.

    SO_PEERCRED cannot be used: gVisor (2022) answers with the *listener's* pid and uid. A process
    can only create files owned by its own uid, and the sticky, unlistable directory keeps others
    from finding or replacing the randomly named proof. It is deleted once used."""
    if not isinstance(name, str) or not name.isalnum():
        return None
    path = os.path.join(PROOF_DIR, name)
    try:
        st = os.lstat(path)
        os.unlink(path)
    except OSError:
        return None
    return st.st_uid if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else None


def _name(uid: int | None) -> str:
    if uid is None:
        return "unknown"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
