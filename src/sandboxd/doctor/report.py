"""A doctor finding: what was checked, how it went, and the command that fixes it."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"  # works, but worse than it could (TCG instead of KVM, no server running yet)
    FAIL = "fail"  # sandboxes will not start, or the host is left in a broken state


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    detail: str
    fix: str | None = None  # a command (or the one thing to do) that makes the check pass

    @classmethod
    def ok(cls, check: str, detail: str) -> Finding:
        return cls(check, Status.OK, detail)

    @classmethod
    def warn(cls, check: str, detail: str, fix: str | None = None) -> Finding:
        return cls(check, Status.WARN, detail, fix)

    @classmethod
    def fail(cls, check: str, detail: str, fix: str | None = None) -> Finding:
        return cls(check, Status.FAIL, detail, fix)


def failed(findings: list[Finding]) -> bool:
    return any(f.status is Status.FAIL for f in findings)
