"""Small OCI images made locally (static busybox, no libc), for tests and benchmarks of FROM:
an ``oci-archive:`` and a registry on loopback, both offline."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BUSYBOX = Path("/bin/busybox")


def busybox_rootfs(dest: Path) -> None:
    """A bare image: busybox with its applets, root in /etc/passwd, nothing else (no ``user``,
    no /tmp: provisioning has to add them)."""
    (dest / "bin").mkdir(parents=True)
    (dest / "etc").mkdir()
    shutil.copyfile(BUSYBOX, dest / "bin" / "busybox")
    os.chmod(dest / "bin" / "busybox", 0o755)
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet not in ("busybox", "linuxrc") and "/" not in applet:
            (dest / "bin" / applet).symlink_to("busybox")
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def oci_archive(rootfs: Path, archive: Path, tag: str = "1", env: dict[str, str] | None = None) -> None:
    """Pack ``rootfs`` as a one-layer OCI image into ``archive`` (umoci + skopeo)."""
    with tempfile.TemporaryDirectory(prefix="sbx-oci-") as tmp:
        layout, bundle = f"{tmp}/layout", f"{tmp}/bundle"
        _run("umoci", "init", "--layout", layout)
        _run("umoci", "new", "--image", f"{layout}:{tag}")
        _run("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
        _run("cp", "-a", f"{rootfs}/.", f"{bundle}/rootfs/")
        _run("umoci", "repack", "--image", f"{layout}:{tag}", bundle)
        for k, v in (env or {}).items():
            _run("umoci", "config", "--image", f"{layout}:{tag}", f"--config.env={k}={v}")
        archive.unlink(missing_ok=True)
        _run("skopeo", "copy", f"oci:{layout}:{tag}", f"oci-archive:{archive}:{tag}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def loopback_registry(storage: Path) -> Iterator[str]:
    """A Docker registry (Debian's ``docker-registry``) on 127.0.0.1; yields ``host:port``."""
    port = _free_port()
    config = storage / "config.yml"
    storage.mkdir(parents=True, exist_ok=True)
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {storage}/data\n"
                      f"http:\n  addr: 127.0.0.1:{port}\nlog:\n  level: error\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def push(archive: Path, tag: str, registry: str, name: str) -> str:
    """Copy an archive's image to ``registry/name:tag``; returns that reference."""
    ref = f"{registry}/{name}:{tag}"
    _run("skopeo", "copy", "--dest-tls-verify=false", f"oci-archive:{archive}:{tag}", f"docker://{ref}")
    return ref
