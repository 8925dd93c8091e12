"""The guest kernel and initramfs: prepared once, verified, and the init script's inputs quoted
so that no argv or environment value can change what the guest runs."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from sandboxd.runtimes.guest import GuestArtifacts, GuestError, load_guest, prepare_guest
from sandboxd.runtimes.guest.initramfs import BUSYBOX, MAX_SPEC_CHARS, cpio_newc, encode_spec
from sandboxd.runtimes.guest.kernel import MODULES


def test_prepare_is_idempotent_and_verified(guest: GuestArtifacts, data_dir: Path) -> None:
    again = prepare_guest(data_dir, print)
    assert again == guest
    assert guest.kernel.read_bytes()[:4] == b"\x7fELF"  # the uncompressed kernel, booted via PVH
    assert guest.kernel.stat().st_mode & 0o222 == 0  # published read-only
    listing = subprocess.run([str(BUSYBOX), "cpio", "-t"], stdin=open(guest.initrd, "rb"),
                             capture_output=True, text=True).stdout.split()
    assert {"init", "bin/busybox", "dev/console", "modules.order"} <= set(listing)
    assert {f"lib/modules/{Path(m).name}" for m in MODULES} <= set(listing)
    with pytest.raises(GuestError, match="no guest artifacts"):
        load_guest(data_dir / "guest", "0" * 32)


def test_a_corrupt_artifact_is_refused(guest: GuestArtifacts, tmp_path: Path) -> None:
    copy = tmp_path / "guest" / guest.key
    copy.mkdir(parents=True)
    for name in ("vmlinux", "initrd.cpio", "meta.json"):
        (copy / name).write_bytes((guest.kernel.parent / name).read_bytes())
    assert load_guest(tmp_path / "guest", guest.key).kernel == copy / "vmlinux"
    with open(copy / "initrd.cpio", "r+b") as f:
        f.seek(1000)
        f.write(b"X")
    with pytest.raises(GuestError, match="does not match its checksum"):
        load_guest(tmp_path / "guest", guest.key)


def test_spec_is_quoted_for_the_init_shell() -> None:
    argv = ["/bin/echo", "a b", "$(reboot)", "'quoted'", '"; rm -rf /', "\\"]
    env = {"PATH": "/bin", "WEIRD": "x y $HOME `id`"}
    script = base64.b64decode(encode_spec(argv, env, "my host")).decode()
    # run the fragment as init would, but print the words instead of exec'ing them
    out = subprocess.run([str(BUSYBOX), "sh", "-c", 'hostname() { echo "host=$1"; }\n' + script
                          + '\nfor w in "$@"; do echo "[$w]"; done'], capture_output=True, text=True).stdout
    words = [line[1:-1] for line in out.splitlines()[1:]]
    assert out.splitlines()[0] == "host=my host"
    assert words == ["env", "-i", "PATH=/bin", "WEIRD=x y $HOME `id`", "switch_root", "/newroot", *argv]
    with pytest.raises(ValueError, match="too long"):
        encode_spec(["x" * MAX_SPEC_CHARS], {}, "h")


def test_cpio_newc_layout() -> None:
    archive = cpio_newc([("a", 0o100644, b"hello", (0, 0)), ("d", 0o040755, b"", (0, 0))])
    assert archive.startswith(b"070701") and len(archive) % 512 == 0
    listing = subprocess.run([str(BUSYBOX), "cpio", "-t"], input=archive, capture_output=True).stdout.split()
    assert listing == [b"a", b"d"]
