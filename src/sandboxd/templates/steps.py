"""What each step means: how it changes the build's state (env, user, workdir) and which
filesystem operation it needs (see :mod:`sandboxd.templates.stepns`).

The rules are E2B's, which the SDK's Dockerfile converter targets: steps run as ``user`` in the
user's home unless USER/WORKDIR said otherwise (the converter starts Dockerfiles with ``USER root``
and ``WORKDIR /`` and ends them with E2B's defaults unless the Dockerfile set its own); COPY files
belong to the current user unless a ``--chown`` is given; RUN goes through ``bash -c`` (``sh -c``
where there is no bash); ENV values expand ``$VARS`` with Docker's word rules against the env built
so far. ARG becomes ENV in the converter, so build args reach sandboxes too, as in E2B.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from e2b_dockerfile_utils import ShellLex

from sandboxd.envd.contract import DEFAULT_PATH, DEFAULT_USER
from sandboxd.templates.spec import Step


def code_hash() -> str:
    """Identity of the code that turns steps into layers: part of every layer key, so a change
    to how steps are carried out can never be served from layers the old code made."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("steps.py", "stepns.py", "contained.py", "images.py", "layers.py", "../envd/contract.py"):
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class BuildState:
    """The context a step runs in; the final one is the sandboxes' runtime config."""

    env: dict[str, str] = field(default_factory=dict)
    user: str = DEFAULT_USER
    workdir: str | None = None  # None: the user's home

    def to_json(self) -> dict[str, Any]:
        return {"env": dict(self.env), "user": self.user, "workdir": self.workdir}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BuildState:
        return cls(env=dict(d.get("env") or {}), user=d.get("user") or DEFAULT_USER, workdir=d.get("workdir"))


def expand(value: str, env: dict[str, str]) -> str:
    """``$VAR``/``${VAR:-x}`` in an ENV value, against the env so far (PATH defaults to the
    standard one, so ``ENV PATH=/opt/bin:$PATH`` works on any base)."""
    lex = ShellLex("\\", env={"PATH": DEFAULT_PATH, **env}, skip_unset_env=False)
    try:
        return lex.process_word(value)
    except ValueError as exc:
        raise ValueError(f"cannot expand {value!r}: {exc}") from exc


def next_state(state: BuildState, step: Step, home: str) -> BuildState:
    """The state after ``step``; ``home`` is the current user's home (relative WORKDIRs)."""
    if step.type == "ENV":
        env = dict(state.env)
        for key, value in zip(step.args[::2], step.args[1::2], strict=True):
            env[key] = expand(value, env)
        return replace(state, env=env)
    if step.type == "WORKDIR":
        return replace(state, workdir=posixpath.normpath(posixpath.join(state.workdir or home, step.args[0])))
    if step.type == "USER":
        return replace(state, user=step.args[0])
    return state


def step_op(step: Step, before: BuildState, after: BuildState, tar: Path | None) -> dict[str, Any] | None:
    """The filesystem operation for ``step`` (None: it only changes state)."""
    if step.type == "RUN":
        user = step.args[1] if len(step.args) > 1 and step.args[1] else None
        return {"op": "run", "cmd": step.args[0], "user": user, "state": before.to_json()}
    if step.type == "COPY":
        src, dest, *rest = step.args
        return {"op": "copy", "tar": str(tar), "src": src, "dest": dest, "owner": rest[0] if rest else "",
                "mode": rest[1] if len(rest) > 1 else "", "state": before.to_json()}
    if step.type == "WORKDIR":
        return {"op": "workdir", "path": after.workdir, "state": before.to_json()}
    if step.type == "USER":
        return {"op": "user", "name": step.args[0]}
    return None


def home_of(user: str, passwd: bytes | None) -> str | None:
    """The home directory of ``user`` (name or uid) in an /etc/passwd, or None if absent."""
    name = user.partition(":")[0]
    for line in (passwd or b"").decode(errors="replace").splitlines():
        row = line.split(":")
        if len(row) >= 6 and (row[0] == name or (name.isdigit() and row[2] == name)):
            return row[5] or "/"
    return None
