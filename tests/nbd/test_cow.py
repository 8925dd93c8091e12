"""CowDevice on real files: the base is never written, each device sees only its own writes,
state survives reopening, and the device matches a byte-array model under random operations."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from nbd_helpers import BASE_SIZE, sha256

from sandboxd.nbd.cow import CowDevice, CowError


def test_reads_come_from_base_until_written(base: Path, tmp_path: Path) -> None:
    before = sha256(base)
    with CowDevice(base, tmp_path / "a", base_id="b1") as dev:
        assert dev.size == BASE_SIZE and dev.dirty_blocks == 0
        assert dev.read(0, 8192) == base.read_bytes()[:8192]
        dev.write(4096 + 100, b"hello")  # partial block: copied up, then patched
        expected = bytearray(base.read_bytes()[:16384])
        expected[4196:4201] = b"hello"
        assert dev.read(0, 16384) == bytes(expected)
        assert dev.dirty_blocks == 1 and dev.copy_ups == 1
    assert sha256(base) == before


def test_two_devices_over_one_base_are_isolated(base: Path, tmp_path: Path) -> None:
    with CowDevice(base, tmp_path / "a", base_id="b1") as a, CowDevice(base, tmp_path / "b", base_id="b1") as b:
        a.write(0, b"A" * 4096)
        b.write(0, b"B" * 4096)
        assert a.read(0, 4096) == b"A" * 4096
        assert b.read(0, 4096) == b"B" * 4096
        assert a.read(4096, 4096) == b.read(4096, 4096) == base.read_bytes()[4096:8192]


def test_state_survives_reopen_and_refuses_another_base(base: Path, tmp_path: Path) -> None:
    with CowDevice(base, tmp_path / "a", base_id="b1", block_size=65536) as dev:
        dev.write(1000, b"x" * 70000)  # spans two 64 KiB blocks, both partial
    # no flush, no clean close of the client: the bits were written through at write time
    with CowDevice(base, tmp_path / "a", base_id="b1", block_size=65536) as dev:
        assert dev.read(1000, 70000) == b"x" * 70000
        assert dev.dirty_blocks == 2
    with pytest.raises(CowError, match="refusing to mix"):
        CowDevice(base, tmp_path / "a", base_id="other-template", block_size=65536)
    with pytest.raises(CowError, match="refusing to mix"):
        CowDevice(base, tmp_path / "a", base_id="b1", block_size=4096)


def test_trim_and_write_zeroes(base: Path, tmp_path: Path) -> None:
    with CowDevice(base, tmp_path / "a", base_id="b1") as dev:
        dev.write(0, b"w" * 16384)
        dev.trim(4096, 8192)  # whole blocks 1-2: the base shows again, overlay space freed
        assert dev.read(4096, 8192) == base.read_bytes()[4096:12288]
        assert dev.read(0, 4096) == b"w" * 4096 and dev.dirty_blocks == 2
        dev.write_zeroes(100, 10000)
        assert dev.read(100, 10000) == bytes(10000)
        assert dev.read(0, 100) == b"w" * 100


def test_clone_state_starts_a_new_device_with_the_same_contents(base: Path, tmp_path: Path) -> None:
    with CowDevice(base, tmp_path / "a", base_id="b1") as a:
        a.write(12345, os.urandom(50000))
        a.clone_state(tmp_path / "c")
        snapshot = a.read(0, BASE_SIZE)
        a.write(0, b"after the clone")
    with CowDevice(base, tmp_path / "c", base_id="b1") as c:
        assert c.read(0, BASE_SIZE) == snapshot
        c.write(0, b"clone's own")
    with CowDevice(base, tmp_path / "a", base_id="b1") as a:
        assert a.read(0, 15) == b"after the clone"


def test_bad_ranges_are_refused(base: Path, tmp_path: Path) -> None:
    with CowDevice(base, tmp_path / "a", base_id="b1") as dev:
        for call in (lambda: dev.read(BASE_SIZE - 1, 2), lambda: dev.write(BASE_SIZE, b"x"),
                     lambda: dev.trim(-1, 10), lambda: dev.write_zeroes(0, BASE_SIZE + 1)):
            with pytest.raises(ValueError, match="outside the device"):
                call()
    with pytest.raises(ValueError):
        CowDevice(base, tmp_path / "b", base_id="b1", block_size=3000)


@pytest.mark.parametrize("block_size", [512, 4096, 65536])
def test_random_operations_match_a_model(base: Path, tmp_path: Path, block_size: int) -> None:
    """Random reads/writes/zeroes/trims (seeded) against a bytearray; trimmed ranges are only
    compared where the device promises content (outside whole trimmed blocks)."""
    rng = random.Random(block_size)
    model = bytearray(base.read_bytes())
    unknown = bytearray(BASE_SIZE)  # 1 where a trim made the content unspecified
    with CowDevice(base, tmp_path / "d", base_id="b1", block_size=block_size) as dev:
        for _ in range(400):
            off = rng.randrange(BASE_SIZE)
            length = min(rng.choice([1, 511, 4096, 5000, 70000]), BASE_SIZE - off)
            op = rng.random()
            if op < 0.4:
                data = rng.randbytes(length)
                dev.write(off, data)
                model[off:off + length] = data
                unknown[off:off + length] = bytes(length)
            elif op < 0.5:
                dev.write_zeroes(off, length)
                model[off:off + length] = bytes(length)
                unknown[off:off + length] = bytes(length)
            elif op < 0.6:
                dev.trim(off, length)
                first, stop = -(-off // block_size) * block_size, (off + length) // block_size * block_size
                if stop > first:
                    unknown[first:stop] = b"\1" * (stop - first)
            got = dev.read(off, length)
            for i in range(length):
                if not unknown[off + i] and got[i] != model[off + i]:
                    raise AssertionError(f"byte {off + i} differs after op at {off}+{length}")
        whole = dev.read(0, BASE_SIZE)
    known = [i for i in range(0, BASE_SIZE, 997) if not unknown[i]]
    assert all(whole[i] == model[i] for i in known)
