"""``GET /files`` (download) and ``POST /files`` (upload), e2b-protocol.md 3.1/3.2.

Both stream: downloads are sent in chunks, uploads (multipart or octet-stream, optionally gzip) are
written as they arrive, so a 100 MB file never sits in memory. Files and the parent directories we
create belong to the requesting user (``username`` query parameter, else the default user).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import zlib
from collections.abc import AsyncIterator
from typing import Any

from . import file_metadata
from .auth import check_files_access
from .http_util import HTTPError, Receive, Scope, Send, body_chunks, header, headers_with_prefix, query, send_json
from .identity import named_user
from .multipart import MultipartError, MultipartParser, PartData, PartEnd, PartStart, boundary_of
from .state import EnvdState
from .users import InvalidPathError, UnknownUserError, User, chown_quietly, makedirs_owned, resolve_path

log = logging.getLogger("envd.files")

DOWNLOAD_CHUNK = 256 * 1024
INLINE_READ = 64 * 1024  # a file's last bytes up to this are read on the loop, not in a thread
METADATA_HEADER_PREFIX = "x-metadata-"


def _os_error_status(e: OSError) -> int:
    """HTTP status for a filesystem error, as upstream envd answers it."""
    if e.errno == errno.ENOENT:
        return 404
    if e.errno == errno.ENOSPC:
        return 507
    if e.errno in (errno.EACCES, errno.EPERM):
        return 403
    if e.errno in (errno.EISDIR, errno.ENOTDIR, errno.EINVAL, errno.ENAMETOOLONG):
        return 400
    return 500


class FilesHandler:
    """Serves /files for one envd."""

    def __init__(self, state: EnvdState) -> None:
        self._state = state

    def _authorize(self, scope: Scope, params: dict[str, str], operation: str) -> User:
        reason = check_files_access(
            token=self._state.access_token,
            header_token=header(scope, "x-access-token"),
            path=params.get("path", ""),
            operation=operation,
            username=params.get("username", ""),
            signature=params.get("signature"),
            signature_expiration=params.get("signature_expiration"),
        )
        if reason is not None:
            raise HTTPError(401, reason)
        try:
            return named_user(params.get("username"), self._state)
        except UnknownUserError as e:
            raise HTTPError(401, f"invalid user: {e}") from e

    async def download(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = query(scope)
        user = self._authorize(scope, params, "read")
        if not params.get("path"):
            raise HTTPError(400, "missing 'path' query parameter")
        path = _resolved(params["path"], user)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            status = _os_error_status(e)
            msg = f"path '{path}' does not exist" if status == 404 else f"cannot open '{path}': {e.strerror}"
            raise HTTPError(status, msg) from e
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise HTTPError(400, f"path '{path}' is a directory")
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/octet-stream"),
                        (b"content-length", str(st.st_size).encode()),
                    ],
                }
            )
            remaining = st.st_size
            while remaining > 0:
                size = min(DOWNLOAD_CHUNK, remaining)
                # a small read is done on the loop: a thread hand-off costs more than it (gVisor)
                chunk = os.read(fd, size) if remaining <= INLINE_READ else await asyncio.to_thread(os.read, fd, size)
                if not chunk:
                    break  # truncated meanwhile; the client sees a short body
                remaining -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": remaining > 0})
            if remaining > 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            os.close(fd)

    async def upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = query(scope)
        user = self._authorize(scope, params, "write")
        metadata = headers_with_prefix(scope, METADATA_HEADER_PREFIX)
        body = _decoded_body(receive, header(scope, "content-encoding"))
        boundary = boundary_of(header(scope, "content-type") or "")
        if boundary is not None:
            written = await self._upload_multipart(body, boundary, params.get("path"), user, metadata)
        else:
            if not params.get("path"):
                raise HTTPError(400, "missing 'path' query parameter")
            dest = _resolved(params["path"], user)
            writer = _FileWriter(dest, user)
            try:
                async for chunk in body:
                    writer.write(chunk)
            except BaseException:
                writer.discard()
                raise
            writer.close()
            written = [writer.finish(metadata)]
        if not written:
            raise HTTPError(400, "no file in request")
        await send_json(send, 200, written)

    async def _upload_multipart(
        self,
        body: AsyncIterator[bytes],
        boundary: str,
        path_param: str | None,
        user: User,
        metadata: dict[str, str],
    ) -> list[dict[str, Any]]:
        parser = MultipartParser(boundary)
        written: list[dict[str, Any]] = []
        writer: _FileWriter | None = None
        try:
            async for chunk in body:
                for event in parser.feed(chunk):
                    if isinstance(event, PartStart):
                        if event.name != "file" or not (event.filename or path_param):
                            continue  # other form fields are ignored
                        # The SDK puts the destination in the filename; a signed upload URL in ?path=.
                        target = path_param or event.filename or ""
                        writer = _FileWriter(_resolved(target, user), user)
                    elif isinstance(event, PartData) and writer is not None:
                        writer.write(event.data)
                    elif isinstance(event, PartEnd) and writer is not None:
                        writer.close()
                        written.append(writer.finish(metadata))
                        writer = None
        except MultipartError as e:
            raise HTTPError(400, f"invalid multipart body: {e}") from e
        finally:
            if writer is not None:  # a part that did not end: incomplete
                writer.discard()
        if not parser.finished:
            raise HTTPError(400, "invalid multipart body: missing closing boundary")
        return written


async def _decoded_body(receive: Receive, content_encoding: str | None) -> AsyncIterator[bytes]:
    """The request body, gunzipped on the fly when ``Content-Encoding: gzip``."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        async for chunk in body_chunks(receive):
            yield chunk
        return
    if encoding not in ("gzip", "x-gzip"):
        raise HTTPError(415, f"unsupported content encoding '{encoding}'")
    inflater = zlib.decompressobj(wbits=31)
    try:
        async for chunk in body_chunks(receive):
            out = inflater.decompress(chunk)
            if out:
                yield out
        tail = inflater.flush()
    except zlib.error as e:
        raise HTTPError(400, f"invalid gzip body: {e}") from e
    if tail:
        yield tail


class _FileWriter:
    """Writes one uploaded file, creating parents owned by the user and owning the result."""

    def __init__(self, path: str, user: User) -> None:
        self.path = path
        self._user = user
        try:
            if os.path.isdir(path):
                raise HTTPError(400, f"path '{path}' is a directory")
            makedirs_owned(os.path.dirname(path), user)
            self._created = not os.path.lexists(path)
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise HTTPError(_os_error_status(e), f"cannot write '{path}': {e.strerror}") from e

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            raise HTTPError(_os_error_status(e), f"cannot write '{self.path}': {e.strerror}") from e

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """The upload failed: close, and remove the file if this upload created it (a partial new
        file must not look like a finished one; an existing file was truncated in place, as
        upstream envd does)."""
        self.close()
        if self._created:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def finish(self, metadata: dict[str, str]) -> dict[str, Any]:
        """Own the file, store metadata xattrs, and describe it for the response."""
        chown_quietly(self.path, self._user)
        item: dict[str, Any] = {"name": os.path.basename(self.path), "type": "file", "path": self.path}
        # always: a file written again has exactly the metadata of this write (E2B's envd clears
        # what an earlier upload left, which O_TRUNC does not)
        stored = file_metadata.STORE.replace(self.path, metadata)
        if stored:
            item["metadata"] = stored
        return item


def _resolved(path: str, user: User) -> str:
    try:
        return resolve_path(path, user)
    except InvalidPathError as e:
        raise HTTPError(400, str(e)) from e
