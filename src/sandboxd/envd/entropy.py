"""Fresh randomness for a guest restored from a memory snapshot.

Every sandbox restored from one snapshot (a fork, a snapshot's sandboxes, a microVM template's
booted image) starts with the same kernel random state: until the kernel reseeds on its own
(up to a minute), ``/dev/urandom`` would give each the same bytes — the same keys, tokens and
nonces. The host sends new entropy with envd's ``/init`` after a restore; envd mixes it in,
credits it, and makes the kernel reseed its generator at once (root, ``CAP_SYS_ADMIN``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct

log = logging.getLogger("envd.entropy")

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2]): add bytes and credit their entropy
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07): reseed the generator from the input pool now


def reseed(seed: bytes) -> bool:
    """Mix ``seed`` into the kernel's pool and reseed its generator; False where the kernel has
    no such ioctls (gVisor, whose randomness is the host's) or envd is not root."""
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("no reseed: %s", exc)
        return False
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
        return True
    except OSError as exc:
        log.info("no reseed: %s", exc)
        return False
    finally:
        os.close(fd)
