"""Looking at host processes through /proc (runtimes, the NBD server and the doctor share this)."""

from __future__ import annotations


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie: a killed QEMU or NBD client that its
    parent has not reaped yet must already count as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
