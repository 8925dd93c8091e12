"""A VM's network inside a slot's guest namespace: a tap bridged to the slot's ``eth0``.

The slot contract (``orchestrator/network.py``) gives the guest namespace an ``eth0`` holding
169.254.0.21/30, default route via 169.254.0.22. A VM's own kernel must own that address, so
while the VM runs::

    slot ns: gl 169.254.0.22 ── guest ns: eth0 ─┐
                                                br0 (no address) ── tap0 ── QEMU virtio-net
                                                                     guest kernel: eth0 169.254.0.21

Why a bridge (and not routing or proxy ARP): it is pure layer 2, so the guest sees the slot's
gateway directly, the slot's DNAT and forward rules apply unchanged, and no address in the guest
namespace could answer for the VM (which would reset its connections). Every VM uses the same
MAC and address; slots are separate namespaces, so snapshots stay portable between slots (the
new gateway ARPs for 169.254.0.21 first, which also refreshes the guest's entry for it).

:func:`unplumb` puts the namespace back as the slot contract says (address and route on eth0).
"""

from __future__ import annotations

import os
import subprocess

from sandboxd.errors import StartError

GUEST_ADDRESS = "169.254.0.21"
GATEWAY_ADDRESS = "169.254.0.22"
TAP = "tap0"
BRIDGE = "br0"
GUEST_MAC = "02:00:a9:fe:00:15"


class VmNetError(StartError):
    pass


def _ip_batch(netns_path: str, commands: str, check: bool = True) -> None:
    proc = subprocess.run(["nsenter", f"--net={netns_path}", "ip", "-force", "-batch", "-"], input=commands,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise VmNetError(f"network setup in {netns_path} failed: {proc.stderr.strip()}")


def plumb(netns_path: str) -> None:
    """Create tap0 and br0 and move the guest address off eth0 (idempotent)."""
    unplumb_links(netns_path)
    _ip_batch(netns_path, (
        f"tuntap add dev {TAP} mode tap\n"
        f"link add {BRIDGE} type bridge forward_delay 0\n"
        "addr flush dev eth0\n"
        f"link set eth0 master {BRIDGE}\n"
        f"link set {TAP} master {BRIDGE}\n"
        f"link set {BRIDGE} up\nlink set {TAP} up\nlink set eth0 up\n"))


def unplumb_links(netns_path: str) -> None:
    _ip_batch(netns_path, f"link del {TAP}\nlink del {BRIDGE}\n", check=False)


def unplumb(netns_path: str) -> None:
    """Remove tap0/br0 and give eth0 its address and default route back (idempotent; nothing to
    do once the slot itself is gone)."""
    if not os.path.exists(netns_path):
        return
    unplumb_links(netns_path)
    _ip_batch(netns_path, (f"addr replace {GUEST_ADDRESS}/30 dev eth0\nlink set eth0 up\n"
                           f"route replace default via {GATEWAY_ADDRESS}\n"))
