"""The egress proxy: a sandbox's TCP connection to an address its rules deny goes through only
if it names a host ``allow_out`` allows — by the TLS server name (SNI) of its ClientHello, or
the ``Host`` of its first HTTP request. DNS answers decide nothing (the sandbox controls what it
resolves and could name any address).

The slot's nftables redirect such connections to a listener this proxy holds *inside* the slot
namespace (on the gateway address), so the kernel's conntrack there knows where each was going
(``SO_ORIGINAL_DST``). An allowed connection is dialled from the slot namespace as well, so it
leaves by the slot's own path and the host's rules (private ranges and the host itself denied)
apply to it as to any packet of the sandbox. Nothing is decrypted — except TLS to a host the
sandbox's ``network.rules`` transform (:mod:`egress_transform`) — the bytes read to find the name
are passed on unchanged, then both directions are copied as they come. With rules, connections
on ports 80 and 443 come here even when their address is allowed, so a rule applies whatever
the address rules say; rules never let through what the address and name rules deny.

One asyncio loop in a thread of its own serves every slot; :meth:`EgressProxy.apply` is called
(from any thread) whenever a slot is made or its rules change, and closes the connections the
new rules no longer allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import os
import re
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sandboxd.orchestrator.egress import DENIED_RANGES, NO_EGRESS, EgressPolicy, HostRule
from sandboxd.orchestrator.egress_ca import SandboxCA
from sandboxd.orchestrator.egress_transform import MissingSecret, TlsServerStream, fill, relay

log = logging.getLogger("sandboxd.egress")

SO_ORIGINAL_DST = 80
CLONE_NEWNET = 0x40000000
#: at most this much is read, for at most this long, to find the name before the connection is refused
MAX_HELLO = 16384
HELLO_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
NEED_MORE = object()
_METHOD = re.compile(rb"[A-Z]{0,16}")
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetnsSockets:
    """Sockets made in another network namespace. One worker thread enters the namespace, makes
    the socket and comes back; a socket belongs for life to the namespace it was made in."""

    def __init__(self) -> None:
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns-sockets")

    def _make(self, netns_path: str, bind: tuple[str, int] | None) -> socket.socket:
        fd = os.open(netns_path, os.O_RDONLY)
        try:
            _setns(fd)
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            finally:
                _setns(self._home)  # raises only if the kernel refuses to take us home: nothing is safe then
        finally:
            os.close(fd)
        try:
            if bind is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(bind)
                sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def socket(self, netns_path: str, bind: tuple[str, int] | None = None) -> socket.socket:
        return self._worker.submit(self._make, netns_path, bind).result()


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where the sandbox was connecting before its slot's nftables redirected it here."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def requested_name(data: bytes) -> str | object | None:
    """The host a connection's first bytes name: TLS SNI or HTTP/1 ``Host`` (without port);
    None if they name none (or are neither), :data:`NEED_MORE` if more bytes are needed."""
    if not data:
        return NEED_MORE
    if data[0] == 0x16:
        return _sni(data)
    method = _METHOD.match(data)
    assert method is not None
    if method.end() == len(data):
        return NEED_MORE
    if method.end() == 0 or data[method.end()] != ord(" "):
        return None  # not HTTP/1
    head, sep, _ = data.partition(b"\r\n\r\n")
    if not sep:
        return NEED_MORE
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host":
            host = value.strip().decode("latin-1")
            if host.startswith("["):
                return None
            return host.rsplit(":", 1)[0] if ":" in host else host
    return None


def _sni(data: bytes) -> str | object | None:
    """The server name of a TLS ClientHello, which may span several records."""
    hello = b""
    pos = 0
    while True:
        if len(data) < pos + 5:
            return NEED_MORE
        kind, _, length = struct.unpack_from("!BHH", data, pos)
        if kind != 0x16:
            return None
        if len(data) < pos + 5 + length:
            return NEED_MORE
        hello += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(hello) >= 4:
            if hello[0] != 1:
                return None
            need = 4 + int.from_bytes(hello[1:4], "big")
            if len(hello) >= need:
                return _sni_of_hello(hello[4:need])


def _sni_of_hello(body: bytes) -> str | None:
    try:
        p = 2 + 32  # version, random
        p += 1 + body[p]  # session id
        p += 2 + int.from_bytes(body[p:p + 2], "big")  # cipher suites
        p += 1 + body[p]  # compression methods
        end = p + 2 + int.from_bytes(body[p:p + 2], "big")
        p += 2
        while p + 4 <= end:
            ext, length = struct.unpack_from("!HH", body, p)
            p += 4
            if ext == 0:  # server_name: list length, then (type, length, name)...
                q, stop = p + 2, p + length
                while q + 3 <= stop:
                    kind, n = body[q], int.from_bytes(body[q + 1:q + 3], "big")
                    if kind == 0:
                        return body[q + 3:q + 3 + n].decode("ascii")
                    q += 3 + n
                return None
            p += length
    except (IndexError, UnicodeDecodeError):
        return None
    return None


@dataclass
class _Connection:
    name: str | None
    address: str
    writers: tuple[asyncio.StreamWriter, asyncio.StreamWriter]


@dataclass
class _Slot:
    netns_path: str
    policy: EgressPolicy
    ca: SandboxCA | None = None
    server: asyncio.base_events.Server | None = None
    connections: set[int] = field(default_factory=set)

    def allows(self, address: str, name: str | None) -> bool:
        return self.policy.allows_address(address) or (name is not None and self.policy.allows_host(name))


class EgressProxy:
    """Serves every slot whose rules allow names; made once per server, started on first use."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sockets: NetnsSockets | None = None
        self._slots: dict[str, _Slot] = {}
        self._open: dict[int, _Connection] = {}
        self._lock = threading.Lock()
        self._secret_value: Callable[[str], str | None] = lambda _: None
        self._upstream_ca: Path | None = None
        self._upstream_ctx: tuple[object, ssl.SSLContext] | None = None

    def configure(self, secret_value: Callable[[str], str | None], upstream_ca: Path | None) -> None:
        """Where placeholders' secrets come from, and CAs (PEM) trusted for upstream certificates
        besides the system's (read again when the file changes)."""
        self._secret_value, self._upstream_ca = secret_value, upstream_ca

    def _start(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._sockets = NetnsSockets()
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="egress-proxy", daemon=True).start()
            self._loop = loop
        return self._loop

    def apply(self, netns: str, netns_path: str, policy: EgressPolicy, listen: tuple[str, int],
              ca: SandboxCA | None = None) -> None:
        """Serve ``netns`` with ``policy`` and the sandbox's CA (or stop serving it if the policy
        names no host and transforms nothing)."""
        with self._lock:
            slot = self._slots.get(netns)
            if not policy.needs_proxy:
                if slot is not None:
                    self._close_locked(netns)
                return
            loop = self._start()
            if slot is None:
                assert self._sockets is not None
                listener = self._sockets.socket(netns_path, listen)
                slot = self._slots[netns] = _Slot(netns_path, policy, ca)
                try:
                    slot.server = asyncio.run_coroutine_threadsafe(
                        asyncio.start_server(lambda r, w: self._handle(slot, r, w), sock=listener), loop).result(10)
                except BaseException:
                    listener.close()
                    del self._slots[netns]
                    raise
            else:
                slot.policy, slot.ca = policy, ca
                loop.call_soon_threadsafe(self._recheck, slot)

    def close(self, netns: str) -> None:
        with self._lock:
            self._close_locked(netns)

    def serving(self, netns: str) -> bool:
        return netns in self._slots

    def _close_locked(self, netns: str) -> None:
        slot = self._slots.pop(netns, None)
        if slot is None or self._loop is None:
            return
        slot.policy = NO_EGRESS  # allows nothing: every connection goes

        def stop() -> None:
            if slot.server is not None:
                slot.server.close()
            self._recheck(slot)

        self._loop.call_soon_threadsafe(stop)

    def _recheck(self, slot: _Slot) -> None:
        """Close the slot's connections whose name its rules no longer allow (loop thread)."""
        for key in list(slot.connections):
            conn = self._open.get(key)
            if conn is not None and not slot.allows(conn.address, conn.name):
                for writer in conn.writers:
                    writer.transport.abort()

    async def _handle(self, slot: _Slot, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(slot, reader, writer)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ConnectionError) as exc:
            log.debug("egress connection ended: %r", exc)
        finally:
            writer.transport.abort()

    async def _serve(self, slot: _Slot, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dest_ip, dest_port = original_destination(writer.get_extra_info("socket"))
        data, found = await asyncio.wait_for(_read_name(reader), HELLO_TIMEOUT_S)
        name = found if isinstance(found, str) else None
        if _private(dest_ip) or not slot.allows(dest_ip, name):
            log.info("egress from %s to %s:%d refused: %s", slot.netns_path, dest_ip, dest_port,
                     f"{name!r} is not allowed" if name is not None else "it names no host")
            return
        rule = slot.policy.rule_for(name) if name is not None and data[:1] == b"\x16" else None
        loop = asyncio.get_running_loop()
        assert self._sockets is not None
        upstream = await loop.run_in_executor(None, self._sockets.socket, slot.netns_path)
        try:
            await asyncio.wait_for(loop.sock_connect(upstream, (dest_ip, dest_port)), CONNECT_TIMEOUT_S)
        except BaseException:
            upstream.close()
            raise
        if rule is not None and name is not None and slot.ca is not None:
            await self._intercept(slot, reader, writer, data, name, upstream, dest_ip)
            return
        up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        key = id(writer)
        self._open[key] = _Connection(name, dest_ip, (writer, up_writer))
        slot.connections.add(key)
        try:
            up_writer.write(data)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            slot.connections.discard(key)
            self._open.pop(key, None)
            up_writer.transport.abort()

    def _upstream_context(self) -> ssl.SSLContext:
        """Verifies an upstream's certificate for the host: the system's CAs and the configured ones."""
        stamp: object = None
        if self._upstream_ca is not None:
            with contextlib.suppress(OSError):
                st = self._upstream_ca.stat()
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._upstream_ctx is None or self._upstream_ctx[0] != stamp:
            ctx = ssl.create_default_context()
            if stamp is not None and self._upstream_ca is not None:
                ctx.load_verify_locations(cafile=str(self._upstream_ca))
            ctx.set_alpn_protocols(["http/1.1"])
            self._upstream_ctx = (stamp, ctx)
        return self._upstream_ctx[1]

    async def _intercept(self, slot: _Slot, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         hello: bytes, name: str, upstream: socket.socket, dest_ip: str) -> None:
        """TLS to a host with a rule: ours toward the sandbox, a verified one to the upstream,
        every request given the rule's headers (see :mod:`egress_transform`)."""
        loop = asyncio.get_running_loop()
        assert slot.ca is not None
        ca = slot.ca
        server_ctx = await loop.run_in_executor(None, ca.server_context, name)
        client = TlsServerStream(reader, writer, server_ctx, hello)
        await asyncio.wait_for(client.handshake(), HELLO_TIMEOUT_S)
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(
                sock=upstream, ssl=self._upstream_context(), server_hostname=name), CONNECT_TIMEOUT_S)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            upstream.close()
            log.info("egress from %s to %s refused: its certificate does not verify: %s", slot.netns_path, name, exc)
            await client.write(_bad_gateway(f"sandboxd egress proxy: the certificate of {name} did not verify "
                                            f"({exc}); no request was sent"))
            return

        async def headers_for() -> dict[str, tuple[str, str]] | None:
            rule: HostRule | None = slot.policy.rule_for(name)
            if rule is None:
                return None
            return await loop.run_in_executor(None, fill, rule, self._secret_value)

        key = id(writer)
        self._open[key] = _Connection(name, dest_ip, (writer, up_writer))
        slot.connections.add(key)
        try:
            await relay(client, up_reader, up_writer, headers_for)
        except MissingSecret as exc:
            log.warning("egress from %s to %s: secret %r of its rule is gone or unreadable: request not sent",
                        slot.netns_path, name, str(exc))
            with contextlib.suppress(OSError, ssl.SSLError):
                await client.write(_bad_gateway(f"sandboxd egress proxy: the secret {str(exc)!r} a network rule "
                                                f"for {name} names does not exist or cannot be read; no request was sent"))
        finally:
            slot.connections.discard(key)
            self._open.pop(key, None)
            up_writer.transport.abort()


def _bad_gateway(message: str) -> bytes:
    body = (message + "\n").encode()
    return (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


async def _read_name(reader: asyncio.StreamReader) -> tuple[bytes, str | object | None]:
    data = b""
    while len(data) < MAX_HELLO:
        chunk = await reader.read(MAX_HELLO - len(data))
        if not chunk:
            return data, None
        data += chunk
        name = requested_name(data)
        if name is not NEED_MORE:
            return data, name
    return data, None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


def _private(address: str) -> bool:
    ip = ipaddress.IPv4Address(address)
    return any(ip in ipaddress.IPv4Network(r) for r in DENIED_RANGES)
