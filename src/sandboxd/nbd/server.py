"""The NBD server (asyncio): fixed newstyle handshake and transmission over per-export unix sockets.

What a client gets, and why:
- options EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY; everything else gets
  ``NBD_REP_ERR_UNSUP`` with a message. No TLS: the sockets are local files, mode 0600;
- commands READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, DISC (with FUA). A well-framed bad request
  (unknown command or flag, range past the end, oversized read) gets an errno *and*, once
  structured replies are negotiated, a message saying what was wrong — and the connection goes
  on. Broken framing (bad magic, an option or write too large to skip) ends that connection only;
  nothing a client sends can stop the server or another export (the fuzz test checks this);
- one client per export at a time: a second one is refused with ``NBD_REP_ERR_POLICY`` unless
  the first one's process is gone (then it is evicted — a crashed client never wedges an export).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from sandboxd.nbd import protocol as p
from sandboxd.nbd.cow import CowDevice, CowError
from sandboxd.nbd.exports import EventLog, Export, ExportPool, ExportState
from sandboxd.proc import pid_alive

log = logging.getLogger("sandboxd.nbd")

TRANSMISSION_FLAGS = (p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH | p.TFLAG_SEND_FUA | p.TFLAG_SEND_TRIM
                      | p.TFLAG_SEND_WRITE_ZEROES)
_ALLOWED_FLAGS = {p.CMD_READ: 0, p.CMD_WRITE: p.CMD_FLAG_FUA, p.CMD_FLUSH: 0, p.CMD_TRIM: p.CMD_FLAG_FUA,
                  p.CMD_WRITE_ZEROES: p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE}
MIN_BLOCK = 512


class ProtocolError(Exception):
    """The client broke the protocol's framing: its connection ends, nothing else does."""


class OptionError(Exception):
    def __init__(self, reply_type: int, message: str) -> None:
        super().__init__(message)
        self.reply_type = reply_type


@dataclass(eq=False)
class _Session:
    pid: int | None
    writer: asyncio.StreamWriter
    no_zeroes: bool = False
    structured: bool = False
    device: CowDevice | None = None


def _peer_pid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    try:
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    except (OSError, AttributeError):
        return None


class NbdServer:
    """Serves an :class:`ExportPool` whose sockets live in ``run_dir`` (one server per run dir)."""

    def __init__(self, run_dir: Path, pool_size: int = 4, max_exports: int = 1024,
                 handshake_timeout: float = 30.0) -> None:
        self.pool = ExportPool(run_dir, max_exports)
        self.pool_size = pool_size
        self.handshake_timeout = handshake_timeout
        self._listeners: dict[str, asyncio.AbstractServer] = {}
        self._sessions: set[_Session] = set()
        self._lock_fd: int | None = None

    @property
    def events(self) -> EventLog:
        return self.pool.events

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the run dir (one server per dir) and open ``pool_size`` ready exports."""
        self.pool.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.pool.run_dir / "server.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another NBD server serves {self.pool.run_dir}") from None
        self._lock_fd = fd
        for _ in range(self.pool_size):
            await self._add_slot()

    async def close(self) -> None:
        """Stop listening, drop clients, flush and close every device."""
        for listener in self._listeners.values():
            listener.close()
        for s in list(self._sessions):
            s.writer.close()
        for export in self.pool.exports.values():
            self.pool.unbind(export)
            export.socket_path.unlink(missing_ok=True)
        self._listeners.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _add_slot(self) -> Export:
        export = self.pool.add_slot()
        export.socket_path.unlink(missing_ok=True)  # left by an earlier server of this run dir
        listener = await asyncio.start_unix_server(functools.partial(self._serve, export),
                                                   path=str(export.socket_path))
        os.chmod(export.socket_path, 0o600)
        self._listeners[export.name] = listener
        return export

    # -- allocation ----------------------------------------------------------------------------

    async def allocate(self, base: Path, cow_dir: Path, base_id: str, owner: str, block_size: int = 4096,
                       prefer: str | None = None) -> ExportState:
        """Bind a ready export to a COW device over ``base`` with its state in ``cow_dir``.

        ``prefer`` asks for a particular slot (the one a recovered sandbox's VMM still names).
        The pool is topped up so the next allocation finds a listening export again."""
        if self.pool.by_owner(owner) is not None:
            raise ValueError(f"{owner} already has an export")
        device = CowDevice(base, cow_dir, base_id=base_id, block_size=block_size)
        try:
            export = self.pool.free_slot(prefer) or await self._add_slot()
        except BaseException:
            device.close()
            raise
        self.pool.bind(export, device, owner)
        if self.pool.free_slot() is None and len(self.pool.exports) < self.pool.max_exports:
            await self._add_slot()
        return export.snapshot()

    async def release(self, owner: str) -> bool:
        """Disconnect the owner's client, flush and close its device, free the slot."""
        export = self.pool.by_owner(owner)
        if export is None:
            return False
        self.pool.unbind(export)
        return True

    def state(self) -> list[ExportState]:
        return self.pool.state()

    def metrics(self) -> dict[str, int]:
        return self.pool.metrics()

    # -- connections ---------------------------------------------------------------------------

    async def _serve(self, export: Export, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = _Session(pid=_peer_pid(writer), writer=writer)
        self._sessions.add(s)
        try:
            if await asyncio.wait_for(self._handshake(export, s, reader), self.handshake_timeout):
                await self._transmit(export, s, reader)
        except ProtocolError as exc:
            self.pool.protocol_errors += 1
            self.pool.events.emit("rejected", export, f"client pid {s.pid}: {exc}")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away (or stalled in the handshake)
        except Exception as exc:  # one connection's bug must not end the server
            log.exception("nbd connection on %s failed", export.name)
            self.pool.events.emit("error", export, f"{type(exc).__name__}: {exc}")
        finally:
            self._sessions.discard(s)
            if export.client_close == writer.close:
                export.client_close, export.client_pid = None, None
                self.pool.events.emit("disconnected", export, f"client pid {s.pid}")
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handshake(self, export: Export, s: _Session, reader: asyncio.StreamReader) -> bool:
        """Options until GO/EXPORT_NAME (→ True) or ABORT (→ False)."""
        s.writer.write(p.server_greeting())
        await s.writer.drain()
        (flags,) = struct.unpack(">I", await reader.readexactly(4))
        if flags & ~p.CLIENT_FLAGS_KNOWN:
            raise ProtocolError(f"unknown client flags 0x{flags:x}")
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("client does not support fixed newstyle negotiation")
        s.no_zeroes = bool(flags & p.FLAG_NO_ZEROES)
        while True:
            magic, option, length = p.OPTION_HEADER.unpack(await reader.readexactly(p.OPTION_HEADER.size))
            if magic != p.IHAVEOPT:
                raise ProtocolError(f"bad option magic 0x{magic:x}")
            if length > p.MAX_OPTION_LENGTH:
                await self._option_reply(s, option, p.REP_ERR_TOO_BIG,
                                         f"option data of {length} bytes (limit {p.MAX_OPTION_LENGTH})".encode())
                raise ProtocolError(f"option {option} with {length} bytes of data")
            data = await reader.readexactly(length)
            if option == p.OPT_EXPORT_NAME:
                return self._export_name(export, s, data)
            if option == p.OPT_ABORT:
                await self._option_reply(s, option, p.REP_ACK)
                return False
            try:
                if await self._option(export, s, option, data):
                    return True
            except OptionError as exc:
                await self._option_reply(s, option, exc.reply_type, str(exc).encode())

    async def _option_reply(self, s: _Session, option: int, reply_type: int, payload: bytes = b"") -> None:
        s.writer.write(p.option_reply(option, reply_type, payload))
        await s.writer.drain()

    def _export_name(self, export: Export, s: _Session, data: bytes) -> bool:
        """NBD_OPT_EXPORT_NAME has no error reply: a bad name can only end the connection."""
        try:
            self._resolve(export, data)
            self._claim(export, s)
        except OptionError as exc:
            raise ProtocolError(f"NBD_OPT_EXPORT_NAME: {exc}") from None
        s.writer.write(p.export_name_reply(s.device.size, TRANSMISSION_FLAGS, s.no_zeroes))  # type: ignore[union-attr]
        return True

    async def _option(self, export: Export, s: _Session, option: int, data: bytes) -> bool:
        """One option; True when transmission starts (GO). Raises OptionError for error replies."""
        if option == p.OPT_STRUCTURED_REPLY:
            if data:
                raise OptionError(p.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            s.structured = True
            await self._option_reply(s, option, p.REP_ACK)
            return False
        if option == p.OPT_LIST:
            if data:
                raise OptionError(p.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            if export.device is not None:
                name = export.name.encode()
                await self._option_reply(s, option, p.REP_SERVER, struct.pack(">I", len(name)) + name)
            await self._option_reply(s, option, p.REP_ACK)
            return False
        if option in (p.OPT_INFO, p.OPT_GO):
            return await self._info_or_go(export, s, option, data)
        if option == p.OPT_STARTTLS:
            raise OptionError(p.REP_ERR_UNSUP, "TLS is not offered: exports are local unix sockets")
        if option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            raise OptionError(p.REP_ERR_UNSUP, "no metadata contexts (block status) are offered")
        raise OptionError(p.REP_ERR_UNSUP, f"unknown option {option}")

    async def _info_or_go(self, export: Export, s: _Session, option: int, data: bytes) -> bool:
        if len(data) < 6:
            raise OptionError(p.REP_ERR_INVALID, "NBD_OPT_INFO/GO data too short")
        (name_len,) = struct.unpack_from(">I", data)
        if name_len > p.MAX_NAME_LENGTH or 4 + name_len + 2 > len(data):
            raise OptionError(p.REP_ERR_INVALID, f"export name length {name_len} does not fit the option")
        (n_req,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 4 + name_len + 2 + 2 * n_req:
            raise OptionError(p.REP_ERR_INVALID, f"{n_req} information requests do not fit the option")
        requests = struct.unpack_from(f">{n_req}H", data, 6 + name_len)
        self._resolve(export, data[4:4 + name_len])
        if option == p.OPT_GO:
            self._claim(export, s)
        device = s.device if option == p.OPT_GO else export.device
        assert device is not None
        await self._option_reply(s, option, p.REP_INFO, p.info_export(device.size, TRANSMISSION_FLAGS))
        await self._option_reply(s, option, p.REP_INFO,
                                 p.info_block_size(MIN_BLOCK, device.block_size, p.MAX_REQUEST_LENGTH))
        if p.INFO_NAME in requests:
            await self._option_reply(s, option, p.REP_INFO, p.info_name(export.name))
        await self._option_reply(s, option, p.REP_ACK)
        return option == p.OPT_GO

    def _resolve(self, export: Export, raw_name: bytes) -> None:
        """This socket serves one export: "" (the default) or its own name."""
        try:
            name = raw_name.decode()
        except UnicodeDecodeError:
            raise OptionError(p.REP_ERR_INVALID, "export name is not UTF-8") from None
        if name not in ("", export.name):
            raise OptionError(p.REP_ERR_UNKNOWN, f"no export {name!r} on this socket (it serves {export.name!r})")
        if export.device is None:
            raise OptionError(p.REP_ERR_UNKNOWN, f"export {export.name} is not allocated to a sandbox")

    def _claim(self, export: Export, s: _Session) -> None:
        """Make ``s`` the export's only client; evict a previous client whose process is gone."""
        if export.client_close is not None:
            if export.client_pid is None or pid_alive(export.client_pid):  # a dead client must not hold an export
                raise OptionError(p.REP_ERR_POLICY, f"export {export.name} is in use by pid {export.client_pid}: "
                                  "one client at a time (two writers would corrupt the device)")
            self.pool.events.emit("evicted", export, f"client pid {export.client_pid} is gone")
            export.client_close()
        export.client_close, export.client_pid = s.writer.close, s.pid
        s.device = export.device
        export.metrics.connections += 1
        self.pool.events.emit("connected", export, f"client pid {s.pid}")

    # -- transmission --------------------------------------------------------------------------

    async def _transmit(self, export: Export, s: _Session, reader: asyncio.StreamReader) -> None:
        await s.writer.drain()
        while True:
            try:
                req = p.parse_request(await reader.readexactly(p.REQUEST.size))
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
            if export.device is not s.device or export.client_close != s.writer.close:
                return  # released or evicted under us
            if req.type == p.CMD_DISC:
                return
            payload = b""
            if req.type == p.CMD_WRITE:
                if req.length > p.MAX_REQUEST_LENGTH:
                    await self._error(export, s, req, p.EOVERFLOW,
                                      f"write of {req.length} bytes exceeds the maximum {p.MAX_REQUEST_LENGTH}")
                    raise ProtocolError(f"write payload of {req.length} bytes cannot be skipped")
                payload = await reader.readexactly(req.length)
            if problem := self._check(req, s):
                await self._error(export, s, req, *problem)
                continue
            try:
                await self._execute(export, s, req, payload)
            except ConnectionError:
                raise  # the client went away mid-reply: not a device error
            except (OSError, CowError) as exc:
                await self._error(export, s, req, p.EIO, f"{req.name} failed: {exc}")

    def _check(self, req: p.Request, s: _Session) -> tuple[int, str] | None:
        """(errno, message) for a well-framed request the server will not execute."""
        if req.type not in _ALLOWED_FLAGS:
            return p.EINVAL, f"unsupported command {req.name}"
        if extra := req.flags & ~_ALLOWED_FLAGS[req.type]:
            return p.EINVAL, f"flags 0x{extra:x} are not valid for {req.name}"
        if req.type == p.CMD_FLUSH:
            return None
        if req.type == p.CMD_READ and req.length > p.MAX_REQUEST_LENGTH:
            return p.EOVERFLOW, f"read of {req.length} bytes exceeds the maximum {p.MAX_REQUEST_LENGTH}"
        size = s.device.size  # type: ignore[union-attr]
        if req.offset + req.length > size:
            errno = p.ENOSPC if req.type in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.EINVAL
            return errno, f"{req.name} of {req.offset}+{req.length} is past the end of the export ({size})"
        return None

    async def _execute(self, export: Export, s: _Session, req: p.Request, payload: bytes) -> None:
        device, m = s.device, export.metrics
        assert device is not None
        if req.type == p.CMD_READ:
            data = device.read(req.offset, req.length)
            m.reads += 1
            m.bytes_read += len(data)
            if s.structured:
                head = (p.offset_data_header(req.handle, req.offset, len(data)) if data
                        else p.chunk(req.handle, p.REPLY_TYPE_NONE, b""))
            else:
                head = p.simple_reply(req.handle)
            s.writer.write(head)
            if data:
                s.writer.write(data)
            await s.writer.drain()
            return
        if req.type == p.CMD_WRITE:
            device.write(req.offset, payload)
            m.writes += 1
            m.bytes_written += len(payload)
        elif req.type == p.CMD_WRITE_ZEROES:
            device.write_zeroes(req.offset, req.length)
            m.write_zeroes += 1
        elif req.type == p.CMD_TRIM:
            device.trim(req.offset, req.length)
            m.trims += 1
        if req.type == p.CMD_FLUSH or req.flags & p.CMD_FLAG_FUA:
            await asyncio.to_thread(device.flush)
            m.flushes += 1
        s.writer.write(p.simple_reply(req.handle))
        await s.writer.drain()

    async def _error(self, export: Export, s: _Session, req: p.Request, errno: int, message: str) -> None:
        export.metrics.errors += 1
        log.info("nbd %s: %s", export.name, message)
        s.writer.write(p.error_chunk(req.handle, errno, message) if s.structured
                       else p.simple_reply(req.handle, errno))
        await s.writer.drain()
