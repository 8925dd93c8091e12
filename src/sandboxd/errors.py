"""The one error family every layer raises when a sandbox's resource could not be made.

Why a family: create and resume turn a failed step into "sandbox failed to start" and retry it.
That is right for a slot that could not be plumbed or a VM that did not boot, and wrong for a
plain bug (a ``KeyError`` in our code would be retried and reported as a start failure). So the
layers (network, rootfs, disk, runtimes, envd) raise subclasses of :class:`StartError`, and the
orchestrator catches exactly those — plus ``OSError``, the host refusing a resource (no space,
no memory, a missing program), which is a start failure too.
"""

from __future__ import annotations


class StartError(RuntimeError):
    """A sandbox resource could not be made or brought up."""


class RootfsGuardError(StartError, ValueError):
    """A runtime was about to be given something other than the sandbox's own copy-on-write
    root (a template's storage, a file where an export belongs): refused, never started."""
