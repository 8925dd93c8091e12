"""``sandboxd doctor``: check a host and its data dir for the failures sandboxd (and E2B's own
stack, see the seed notes) is known for, each finding with the command that fixes it."""

from sandboxd.doctor.report import Finding, Status
from sandboxd.doctor.run import run_checks

__all__ = ["Finding", "Status", "run_checks"]
