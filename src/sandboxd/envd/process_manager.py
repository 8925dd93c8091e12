"""Child processes started by envd: spawn, output fan-out, stdin, signals, exit status.

Why not asyncio's subprocess: its ``wait()`` semantics around pipe closure changed between Python
versions, and a grandchild that keeps stdout open (``nohup srv &``) must not keep a command's end
event from being sent. So we spawn with :class:`subprocess.Popen` onto pipes of our own, read the
raw fds with ``loop.add_reader`` and learn of the exit on the loop: SIGCHLD (through the loop's
signal handling) makes us ``waitpid(WNOHANG)`` each of our own children (tini reaps everything
else). A thread per child did the same but cost a thread start (and its hand-over) per command,
~1 ms under gVisor; it is still the fallback where the loop cannot take signals (not the main
thread). This module knows nothing about protobuf.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import select
import signal
import struct
import subprocess
import termios
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .oom_guard import Victim
from .users import User

log = logging.getLogger("envd.process")

READ_CHUNK = 32 * 1024  # upstream sends at most 32 KiB per data event
#: The bundle's id switcher (templates/as_user.c): CPython forks all of envd to start a child
#: under other ids (~50 ms under gVisor), but vforks (~10 ms) one that keeps them; so envd
#: vforks ``as-user``, which switches ids and execs the command.
AS_USER = "/opt/sandboxd/bin/as-user"
DRAIN_GRACE_S = 0.5  # after exit, how long to wait for output still held by grandchildren


@dataclass(frozen=True)
class ProcessSpec:
    """What the client asked for (echoed back by List)."""

    cmd: str
    args: tuple[str, ...]
    envs: dict[str, str]
    cwd: str | None
    tag: str | None = None


@dataclass(frozen=True)
class ExitInfo:
    """How a process ended, in upstream (Go ``os.ProcessState``) terms."""

    exit_code: int
    exited: bool
    status: str
    error: str | None
    timed_out: bool = False


@dataclass(frozen=True)
class OutputEvent:
    """A chunk of output; ``stream`` is ``stdout``, ``stderr`` or ``pty``."""

    stream: str
    data: bytes


Event = OutputEvent | ExitInfo


class SpawnError(Exception):
    """The process could not be started (bad cwd, missing executable...): a client error."""


def exit_info(wait_status: int, timed_out: bool = False) -> ExitInfo:
    """Translate a waitpid status the way Go's ProcessState does (SIGKILL → -1, ``signal: killed``)."""
    code = os.waitstatus_to_exitcode(wait_status)
    if code >= 0:
        status = f"exit status {code}"
        return ExitInfo(code, True, status, status if code else None, timed_out)
    name = (signal.strsignal(-code) or f"signal {-code}").lower()
    status = f"signal: {name}"
    return ExitInfo(-1, False, status, status, timed_out)


def set_winsize(fd: int, cols: int, rows: int) -> None:
    """Resize a PTY (TIOCSWINSZ); the foreground job gets SIGWINCH from the kernel."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _make_controlling_tty() -> None:  # runs in the child, after setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@dataclass(eq=False)
class ManagedProcess:
    """One running child and everyone listening to it."""

    pid: int
    spec: ProcessSpec
    popen: subprocess.Popen[bytes]
    stdin_fd: int | None
    pty_fd: int | None
    subscribers: set[asyncio.Queue[Event]] = field(default_factory=set)
    exit: ExitInfo | None = None
    timed_out: bool = False
    stdin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    deadline: asyncio.TimerHandle | None = None

    def subscribe(self) -> asyncio.Queue[Event]:
        """A queue receiving every event from now on (output chunks, then the ExitInfo)."""
        q: asyncio.Queue[Event] = asyncio.Queue()
        if self.exit is not None:
            q.put_nowait(self.exit)
        else:
            self.subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Event]) -> None:
        """Stop delivering to ``q``; the process keeps running (a disconnect never kills)."""
        self.subscribers.discard(q)

    def publish(self, event: Event) -> None:
        """Fan an event out to every current subscriber."""
        for q in self.subscribers:
            q.put_nowait(event)

    def signal(self, sig: int) -> None:
        """Signal the whole process group (the command and what it spawned); the leader as fallback."""
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    async def write_input(self, data: bytes, pty: bool) -> None:
        """Write to stdin (or the PTY) without blocking the loop if the child does not read."""
        fd = self.pty_fd if pty else self.stdin_fd
        if fd is None:
            raise SpawnError("pty not enabled for this process" if pty else "stdin not enabled for this process")
        async with self.stdin_lock:
            view = memoryview(data)
            while view:
                n = await asyncio.to_thread(_blocking_write, fd, bytes(view))
                view = view[n:]

    async def close_stdin(self) -> None:
        """Send EOF on stdin (non-PTY only)."""
        if self.stdin_fd is None:
            raise SpawnError("stdin not enabled or already closed")
        async with self.stdin_lock:
            fd, self.stdin_fd = self.stdin_fd, None
            if fd is not None:
                os.close(fd)

    def resize(self, cols: int, rows: int) -> None:
        """Resize the PTY of a PTY process."""
        if self.pty_fd is None:
            raise SpawnError("process has no pty")
        set_winsize(self.pty_fd, cols, rows)


def _blocking_write(fd: int, data: bytes) -> int:
    """os.write on a possibly non-blocking fd (a PTY master is shared with the reader)."""
    while True:
        try:
            return os.write(fd, data)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)


class ProcessManager:
    """All processes envd started and has not yet seen exit, by pid."""

    def __init__(self) -> None:
        self._procs: dict[int, ManagedProcess] = {}
        #: called just before each spawn (the OOM guard's ``wake``: it slows down while idle)
        self.before_spawn: Callable[[], object] = lambda: None
        self._children: _ChildWatcher | None = None  # made on the first start, on its loop
        self._draining: set[asyncio.Task[None]] = set()

    def get(self, pid: int) -> ManagedProcess | None:
        return self._procs.get(pid)

    def by_tag(self, tag: str) -> ManagedProcess | None:
        return next((p for p in self._procs.values() if p.spec.tag == tag), None)

    def all(self) -> list[ManagedProcess]:
        return list(self._procs.values())

    def start(
        self,
        spec: ProcessSpec,
        *,
        user: User,
        env: dict[str, str],
        cwd: str,
        stdin: bool,
        pty_size: tuple[int, int] | None,
        timeout_s: float | None,
    ) -> tuple[ManagedProcess, asyncio.Queue[Event]]:
        """Spawn and register a process; returns it with a queue already subscribed.

        Synchronous on purpose: nothing can be published before the caller holds the queue.
        """
        if not os.path.isdir(cwd):
            raise SpawnError(f"cwd '{cwd}' does not exist or is not a directory")
        loop = asyncio.get_running_loop()
        if self._children is None:
            self._children = _ChildWatcher.on(loop)
        creds = _credentials(user)
        self.before_spawn()
        pty_fd: int | None
        if pty_size is not None:
            popen, stdin_fd, pty_fd, readers = _spawn_pty(spec, env, cwd, creds, pty_size)
        else:
            popen, stdin_fd, pty_fd, readers = _spawn_pipes(spec, env, cwd, creds, stdin)
        mp = ManagedProcess(popen.pid, spec, popen, stdin_fd, pty_fd)
        queue = mp.subscribe()
        self._procs[mp.pid] = mp
        log.info("started pid=%d user=%s cmd=%r args=%r", mp.pid, user.name, spec.cmd, list(spec.args))
        children = self._children
        done: list[_FdReader] = []

        def on_eof() -> None:
            # every output at EOF: the child has most likely exited; look now instead of after
            # SIGCHLD's trip through the loop's signal handling
            if all(r.closed.done() for r in done):
                children.poll(mp.pid)

        done.extend(_FdReader(loop, fd, name, mp.publish, on_eof) for name, fd in readers)
        if timeout_s is not None:
            mp.deadline = loop.call_later(max(timeout_s, 0.0), self._deadline, mp)
        children.watch(mp.pid, lambda status: self._exited(mp, status, done))
        return mp, queue

    def _deadline(self, mp: ManagedProcess) -> None:
        """Connect-Timeout-Ms passed: upstream treats it as the process lifetime, so kill it."""
        if mp.exit is None:
            log.info("pid=%d exceeded its timeout, killing", mp.pid)
            mp.timed_out = True
            mp.signal(signal.SIGKILL)

    def _exited(self, mp: ManagedProcess, status: int, readers: list[_FdReader]) -> None:
        """The child exited: publish its end now if its output is all read (the usual case),
        else once the readers drained (bounded: a grandchild may hold the pipes)."""
        if all(r.closed.done() for r in readers):
            self._finish(mp, status, readers)
        else:
            task = asyncio.get_running_loop().create_task(self._drain_then_finish(mp, status, readers))
            self._draining.add(task)  # the loop holds tasks only weakly
            task.add_done_callback(self._draining.discard)

    async def _drain_then_finish(self, mp: ManagedProcess, status: int, readers: list[_FdReader]) -> None:
        pending = [r.closed for r in readers if not r.closed.done()]
        if pending:
            await asyncio.wait(pending, timeout=DRAIN_GRACE_S)
        self._finish(mp, status, readers)

    def _finish(self, mp: ManagedProcess, status: int, readers: list[_FdReader]) -> None:
        """Publish the end and forget the pid (output read or given up on)."""
        for r in readers:
            r.close()
        for fd in (mp.stdin_fd, mp.pty_fd):
            if fd is not None:
                _close_quietly(fd)
        mp.stdin_fd = mp.pty_fd = None
        if mp.deadline is not None:
            mp.deadline.cancel()
        mp.popen.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
        info = exit_info(status, mp.timed_out)
        mp.exit = info
        log.info("pid=%d ended: %s", mp.pid, info.status)
        mp.publish(info)
        mp.subscribers.clear()
        self._procs.pop(mp.pid, None)

    def oom_killed(self, victim: Victim) -> None:
        """The OOM guard killed ``victim``: tell whoever watches the command it belonged to (the
        process itself or one it started: every command is a session of its own)."""
        mp = self._procs.get(victim.session) or self._procs.get(victim.pid)
        if mp is None:
            return
        message = (f"sandboxd: out of memory: killed process {victim.pid} ({victim.name}) using "
                   f"{victim.rss_bytes >> 20} MiB; this sandbox has {victim.total_bytes >> 20} MiB of memory\n")
        mp.publish(OutputEvent("pty" if mp.pty_fd is not None else "stderr", message.encode()))

    def kill_all(self) -> None:
        """envd is shutting down: take every child with it."""
        for mp in self.all():
            mp.signal(signal.SIGKILL)


@dataclass(frozen=True)
class _Creds:
    uid: int | None
    gid: int | None
    groups: list[int] | None


def _credentials(user: User) -> _Creds:
    """Switch identity only when we can (root); a non-root dev run spawns as itself."""
    if os.geteuid() != 0:
        return _Creds(None, None, None)
    return _Creds(user.uid, user.gid, list(user.groups))


def _spawn_pipes(
    spec: ProcessSpec, env: dict[str, str], cwd: str, creds: _Creds, stdin: bool
) -> tuple[subprocess.Popen[bytes], int | None, None, list[tuple[str, int]]]:
    argv = [spec.cmd, *spec.args]
    err_r = err_w = -1
    if creds.uid is not None and creds.gid is not None and os.access(AS_USER, os.X_OK):
        err_r, err_w = os.pipe()  # as-user writes its exec's errno here
        groups = ",".join(str(g) for g in creds.groups or []) or "-"
        argv = [AS_USER, str(creds.uid), str(creds.gid), groups, str(err_w), *argv]
        creds = _Creds(None, None, None)  # as-user switches, so Popen can vfork
    # our own pipes (close-on-exec; Popen dups the child's ends to 0-2): no file objects to
    # dup and close again, each a syscall gVisor intercepts
    in_r, in_w = os.pipe() if stdin else (subprocess.DEVNULL, -1)
    out_r, out_w = os.pipe()
    err_out_r, err_out_w = os.pipe()
    try:
        popen = subprocess.Popen(
            argv,
            stdin=in_r,
            stdout=out_w,
            stderr=err_out_w,
            env=env,
            cwd=cwd,
            user=creds.uid,
            group=creds.gid,
            extra_groups=creds.groups,
            start_new_session=True,
            close_fds=True,
            pass_fds=(err_w,) if err_w >= 0 else (),
        )
    except OSError as e:
        for fd in (err_r, in_w, out_r, err_out_r):
            _close_quietly(fd)
        raise SpawnError(f"failed to start '{spec.cmd}': {e.strerror or e}") from e
    finally:
        # the child has its own copies: EOF on ours once it exits (err_w: once it exec'd)
        for fd in (err_w, in_r, out_w, err_out_w):
            if fd >= 0:
                os.close(fd)
    if err_r >= 0:
        try:
            _raise_exec_failure(popen, err_r, spec.cmd)
        except OSError as e:
            for fd in (in_w, out_r, err_out_r):
                _close_quietly(fd)
            raise SpawnError(f"failed to start '{spec.cmd}': {e.strerror or e}") from e
        finally:
            os.close(err_r)
    return popen, (in_w if in_w >= 0 else None), None, [("stdout", out_r), ("stderr", err_out_r)]


def _raise_exec_failure(popen: subprocess.Popen[bytes], err_r: int, cmd: str) -> None:
    """Wait until as-user exec'd the command (its end of the pipe closes) or failed to (it wrote
    the errno): then raise that OSError, as Popen does for a command it starts itself."""
    failure = b""
    while chunk := os.read(err_r, 4 - len(failure)):
        failure += chunk
        if len(failure) == 4:
            break
    if not failure:
        return
    popen.wait()
    code = int.from_bytes(failure.ljust(4, b"\0"), "little")
    raise OSError(code, os.strerror(code), cmd)


def _spawn_pty(
    spec: ProcessSpec, env: dict[str, str], cwd: str, creds: _Creds, size: tuple[int, int]
) -> tuple[subprocess.Popen[bytes], None, int, list[tuple[str, int]]]:
    master, slave = os.openpty()
    try:
        set_winsize(master, *size)
        if creds.uid is not None:
            os.fchown(slave, creds.uid, -1)
        popen = subprocess.Popen(
            [spec.cmd, *spec.args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=cwd,
            user=creds.uid,
            group=creds.gid,
            extra_groups=creds.groups,
            start_new_session=True,
            preexec_fn=_make_controlling_tty,
            close_fds=True,
        )
    except OSError as e:
        os.close(master)
        raise SpawnError(f"failed to start '{spec.cmd}': {e.strerror or e}") from e
    finally:
        os.close(slave)
    reader_fd = os.dup(master)
    return popen, None, master, [("pty", reader_fd)]


class _FdReader:
    """Reads an fd on the event loop and publishes chunks until EOF (EIO on a PTY is EOF too)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, name: str, publish: Callable[[Event], None],
                 on_eof: Callable[[], None] = lambda: None) -> None:
        self._loop, self._fd, self._name, self._publish, self._on_eof = loop, fd, name, publish, on_eof
        self.closed: asyncio.Future[None] = loop.create_future()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno not in (errno.EIO, errno.EBADF):
                log.warning("read %s: %s", self._name, e)
            data = b""
        if not data:
            self.close()
            self._on_eof()
            return
        self._publish(OutputEvent(self._name, data))

    def close(self) -> None:
        if self.closed.done():
            return
        self._loop.remove_reader(self._fd)
        _close_quietly(self._fd)
        self.closed.set_result(None)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class _ChildWatcher:
    """Learns when envd's children exit: on SIGCHLD, ``waitpid(pid, WNOHANG)`` for each child it
    watches (never ``-1``: a child someone else waits for, as ``subprocess.run`` in a thread
    does, is left to them). Runs on the loop; ``on_exit`` gets the raw wait status."""

    def __init__(self, loop: asyncio.AbstractEventLoop, by_signal: bool) -> None:
        self._loop = loop
        self._by_signal = by_signal
        self._watched: dict[int, Callable[[int], object]] = {}

    @classmethod
    def on(cls, loop: asyncio.AbstractEventLoop) -> _ChildWatcher:
        watcher = cls(loop, by_signal=True)
        try:
            loop.add_signal_handler(signal.SIGCHLD, watcher._reap)
        except (RuntimeError, ValueError) as e:  # not the main thread: a thread per child
            log.info("child exits waited for in threads: %s", e)
            watcher._by_signal = False
        return watcher

    def watch(self, pid: int, on_exit: Callable[[int], object]) -> None:
        if not self._by_signal:
            _wait_in_thread(self._loop, pid, on_exit)
            return
        self._watched[pid] = on_exit
        self._loop.call_soon(self._reap)  # it may be gone already (its SIGCHLD came first)

    def poll(self, pid: int) -> None:
        """Look at ``pid`` alone now (its SIGCHLD still comes: the next ``_reap`` skips it)."""
        if pid in self._watched:
            self._reap_one(pid)

    def _reap(self) -> None:
        for pid in list(self._watched):
            self._reap_one(pid)

    def _reap_one(self, pid: int) -> None:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 255 << 8  # someone else reaped it; report a failure rather than hang
        if done:
            self._watched.pop(pid)(status)


def _wait_in_thread(loop: asyncio.AbstractEventLoop, pid: int, on_exit: Callable[[int], object]) -> None:
    """waitpid(pid) in a daemon thread and hand the raw status back to the loop."""

    def wait() -> None:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                status = 255 << 8  # someone else reaped it; report a failure rather than hang
                break
        loop.call_soon_threadsafe(on_exit, status)

    threading.Thread(target=wait, name=f"wait-{pid}", daemon=True).start()
