"""Copy-on-write block device: a shared read-only base image below, one device's overlay above.

Seed 004: VMs given the template file itself corrupted it. Here the base image is opened
``O_RDONLY`` and nothing in this module ever writes to it; every write lands in the device's own
sparse ``overlay.img`` and sets the block's bit in ``dirty.bitmap``. A read takes each block from
the overlay if its bit is set, else from the base.

Durability model, chosen so a device survives its *client* and its *server* dying:
- data is written to the overlay before the bit that makes it visible, and a newly set bit is
  written to the bitmap file (one small ``pwrite``) before the write is acknowledged. Both land
  in the host's page cache, so a crash of this process loses nothing the client was told about;
- FLUSH fsyncs the overlay, then the bitmap: what the guest flushed survives a host crash too.

The bitmap file starts with a header naming the block size, device size and base image id, so an
overlay can never be reopened over another base (a rebuilt template) or with another block size.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

from sandboxd.errors import StartError

HEADER = struct.Struct(">8sIQ64s")  # magic, block size, device size, base id
HEADER_SIZE = 4096  # the bitmap starts page-aligned
MAGIC = b"SBXCOW1\n"
OVERLAY_NAME = "overlay.img"
BITMAP_NAME = "dirty.bitmap"

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class CowError(StartError):
    """The device's files do not fit together (other base, other block size) or an I/O failed."""


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range of a file (reads then return zeros); the file keeps its size."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class CowDevice:
    """One copy-on-write device; its state lives in ``state_dir`` (``overlay.img``, ``dirty.bitmap``).

    Opening an existing ``state_dir`` continues where the last user stopped (a crashed client or
    server leaves a reusable device). ``base_id`` identifies the base image's bytes (its checksum);
    the state refuses to open over any other."""

    def __init__(self, base: Path, state_dir: Path, base_id: str, block_size: int = 4096) -> None:
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError(f"block size must be a power of two ≥ 512, not {block_size}")
        if not base_id or len(base_id.encode()) > 64:
            raise ValueError("base_id must be 1-64 bytes")
        self.base_path = Path(base)
        self.state_dir = Path(state_dir)
        self.block_size = block_size
        self.base_id = base_id
        self.copy_ups = 0
        self._base = os.open(self.base_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.size = os.fstat(self._base).st_size
            self.blocks = -(-self.size // block_size)
            self._overlay, self._bitmap_fd, self._bits = self._open_state()
        except BaseException:
            os.close(self._base)
            raise
        self.dirty_blocks = int.from_bytes(self._bits, "little").bit_count()
        self.closed = False

    # -- state files ---------------------------------------------------------------------------

    def _header(self) -> bytes:
        return HEADER.pack(MAGIC, self.block_size, self.size, self.base_id.encode()).ljust(HEADER_SIZE, b"\0")

    def _open_state(self) -> tuple[int, int, bytearray]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        bitmap_path = self.state_dir / BITMAP_NAME
        nbytes = -(-self.blocks // 8)
        fd = os.open(bitmap_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            head = os.pread(fd, HEADER_SIZE, 0)
            if not head:
                os.pwrite(fd, self._header() + bytes(nbytes), 0)
                os.fsync(fd)
            elif head != self._header():
                raise CowError(self._mismatch(head))
            bits = bytearray(os.pread(fd, nbytes, HEADER_SIZE))
            if len(bits) != nbytes:
                raise CowError(f"{bitmap_path} is truncated")
            overlay = os.open(self.state_dir / OVERLAY_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.ftruncate(overlay, self.size)
        except BaseException:
            os.close(fd)
            raise
        return overlay, fd, bits

    def _mismatch(self, head: bytes) -> str:
        try:
            magic, bs, size, base_id = HEADER.unpack_from(head)
        except struct.error:
            return f"{self.state_dir / BITMAP_NAME}: not a COW bitmap"
        if magic != MAGIC:
            return f"{self.state_dir / BITMAP_NAME}: not a COW bitmap"
        other = base_id.rstrip(b"\0").decode(errors="replace")
        return (f"COW state {self.state_dir} belongs to base {other} "
                f"(size {size}, block size {bs}), not {self.base_id} (size {self.size}, block size "
                f"{self.block_size}): refusing to mix an overlay with another base")

    # -- bitmap --------------------------------------------------------------------------------

    def is_dirty(self, block: int) -> bool:
        return bool(self._bits[block >> 3] & (1 << (block & 7)))

    def _run_end(self, block: int, last: int, dirty: bool) -> int:
        """First block after ``block`` (≤ last+1) whose state differs from ``dirty``."""
        full = 0xFF if dirty else 0
        b = block + 1
        while b <= last:
            if b & 7 == 0 and b + 8 <= last + 1 and self._bits[b >> 3] == full:
                b += 8
            elif self.is_dirty(b) == dirty:
                b += 1
            else:
                break
        return b

    def _set_bits(self, first: int, last: int, value: bool) -> None:
        """Set or clear blocks first..last and write the changed bitmap bytes through."""
        changed = 0
        for b in range(first, last + 1):
            if self.is_dirty(b) != value:
                self._bits[b >> 3] ^= 1 << (b & 7)
                changed += 1
        if changed:
            self.dirty_blocks += changed if value else -changed
            lo, hi = first >> 3, (last >> 3) + 1
            os.pwrite(self._bitmap_fd, bytes(self._bits[lo:hi]), HEADER_SIZE + lo)

    # -- I/O -----------------------------------------------------------------------------------

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} is outside the device (size {self.size})")

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the device: runs of dirty blocks from the overlay, the rest from the base."""
        self.check_range(offset, length)
        if length == 0:
            return b""
        end, bs = offset + length, self.block_size
        last = (end - 1) // bs
        pieces = []
        pos = offset
        while pos < end:
            block = pos // bs
            dirty = self.is_dirty(block)
            run_end = min(end, self._run_end(block, last, dirty) * bs)
            data = os.pread(self._overlay if dirty else self._base, run_end - pos, pos)
            if len(data) != run_end - pos:
                raise CowError(f"short read at {pos} from the {'overlay' if dirty else 'base'}")
            pieces.append(data)
            pos = run_end
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _block_span(self, block: int) -> tuple[int, int]:
        start = block * self.block_size
        return start, min(start + self.block_size, self.size)

    def _copy_up(self, block: int) -> None:
        """Give a clean block its base bytes in the overlay before a partial write changes it."""
        start, stop = self._block_span(block)
        os.pwrite(self._overlay, os.pread(self._base, stop - start, start), start)
        self.copy_ups += 1

    def _prepare_partial(self, offset: int, end: int) -> tuple[int, int]:
        """Copy up the clean, partially covered edge blocks of [offset, end); return (first, last)."""
        first, last = offset // self.block_size, (end - 1) // self.block_size
        for block in {first, last}:
            start, stop = self._block_span(block)
            if not self.is_dirty(block) and (offset > start or end < stop):
                self._copy_up(block)
        return first, last

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.check_range(offset, len(data))
        if not data:
            return
        first, last = self._prepare_partial(offset, offset + len(data))
        if os.pwrite(self._overlay, data, offset) != len(data):
            raise CowError(f"short write at {offset}")
        self._set_bits(first, last, True)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zeros over the range: whole blocks become holes in the overlay (no space used)."""
        self.check_range(offset, length)
        if length == 0:
            return
        end = offset + length
        first, last = self._prepare_partial(offset, end)
        try:
            punch_hole(self._overlay, offset, length)
        except OSError:
            os.pwrite(self._overlay, bytes(length), offset)
        self._set_bits(first, last, True)

    def trim(self, offset: int, length: int) -> None:
        """Forget whole blocks in the range: their overlay space is freed and reads show the base
        again (after a trim the protocol promises no particular content). Partial blocks stay."""
        self.check_range(offset, length)
        bs = self.block_size
        first, stop = -(-offset // bs), (offset + length) // bs
        if offset + length == self.size:
            stop = self.blocks  # a trim to the end covers a partial last block too
        if stop <= first:
            return
        self._set_bits(first, stop - 1, False)
        start, end = first * bs, min(stop * bs, self.size)
        try:
            punch_hole(self._overlay, start, end - start)
        except OSError:
            pass  # the space stays allocated; the content is already invisible

    def flush(self) -> None:
        """Make everything acknowledged so far durable: overlay data first, then the bits."""
        os.fsync(self._overlay)
        os.fsync(self._bitmap_fd)

    def clone_state(self, dest_dir: Path) -> None:
        """Copy this device's state (only its dirty blocks) to a fresh ``dest_dir``: a new device
        over the same base that starts with exactly these contents (snapshot-based starts)."""
        dest_dir = Path(dest_dir)
        if (dest_dir / BITMAP_NAME).exists():
            raise CowError(f"{dest_dir} already holds COW state")
        self.flush()
        dest_dir.mkdir(parents=True, exist_ok=True)
        (dest_dir / OVERLAY_NAME).unlink(missing_ok=True)  # left by a clone that crashed
        out = os.open(dest_dir / OVERLAY_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(out, self.size)
            block = 0
            while block < self.blocks:
                end_block = self._run_end(block, self.blocks - 1, self.is_dirty(block))
                if self.is_dirty(block):
                    start, stop = block * self.block_size, min(end_block * self.block_size, self.size)
                    for pos in range(start, stop, 1 << 20):
                        os.pwrite(out, os.pread(self._overlay, min(1 << 20, stop - pos), pos), pos)
                block = end_block
            os.fsync(out)
        finally:
            os.close(out)
        tmp = dest_dir / (BITMAP_NAME + ".tmp")
        tmp.write_bytes(self._header() + bytes(self._bits))
        os.rename(tmp, dest_dir / BITMAP_NAME)  # the bitmap last: its presence means "complete"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in (self._overlay, self._bitmap_fd, self._base):
            os.close(fd)

    def __enter__(self) -> CowDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
