"""What a template build asks for: a base (image or template), steps, start and ready commands.

The shape is the one the e2b SDK sends to ``POST /v2/templates/{id}/builds/{buildID}`` (protocol
note 2.4), so the API passes the body through unchanged and the CLI produces the same JSON from a
Dockerfile with the SDK's own converter (:mod:`sandboxd.templates.dockerfile`). One shape, one
builder: a Dockerfile built either way gives the same build.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

STEP_TYPES = ("COPY", "ENV", "RUN", "WORKDIR", "USER")
DEFAULT_BASE_IMAGE = "e2bdev/base"
_FILES_HASH = re.compile(r"^[0-9a-f]{64}$")


class SpecError(ValueError):
    """The request itself is wrong (a 400, not a failed build)."""


@dataclass(frozen=True)
class Step:
    """One instruction: ``type`` and ``args`` as the SDK sends them (see the protocol note)."""

    type: str
    args: tuple[str, ...]
    force: bool = False
    files_hash: str | None = None

    def describe(self) -> str:
        """The step as a person reads it in a log line: ``RUN pip install x``."""
        if self.type == "ENV":
            pairs = zip(self.args[::2], self.args[1::2], strict=True)
            return "ENV " + " ".join(f"{k}={v}" for k, v in pairs)
        if self.type == "COPY":
            src, dest, *rest = self.args
            extra = [f"--chown={rest[0]}"] if rest and rest[0] else []
            extra += [f"--chmod={rest[1]}"] if len(rest) > 1 and rest[1] else []
            return " ".join(["COPY", *extra, src, dest])
        if self.type == "RUN" and len(self.args) > 1 and self.args[1]:
            return f"RUN (as {self.args[1]}) {self.args[0]}"
        return f"{self.type} {' '.join(self.args)}"

    def identity(self) -> dict[str, Any]:
        """What of the step goes into its layer key (``force`` is handled by the caller)."""
        return {"type": self.type, "args": list(self.args), "filesHash": self.files_hash}


@dataclass(frozen=True)
class RegistryAuth:
    """``fromImageRegistry`` of type ``registry`` (the only kind a local node can use)."""

    username: str
    password: str


@dataclass(frozen=True)
class BuildSpec:
    """A whole build request. Exactly one of ``from_image``/``from_template`` is set."""

    from_image: str | None = DEFAULT_BASE_IMAGE
    from_template: str | None = None
    steps: tuple[Step, ...] = ()
    start_cmd: str | None = None
    ready_cmd: str | None = None
    force: bool = False
    registry_auth: RegistryAuth | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> BuildSpec:
        """Validate the SDK's JSON (``TemplateBuildStartV2``); raise :class:`SpecError`."""
        if not isinstance(body, dict):
            raise SpecError("build body must be a JSON object")
        from_image, from_template = body.get("fromImage"), body.get("fromTemplate")
        if from_image and from_template:
            raise SpecError("give either fromImage or fromTemplate, not both")
        if not from_image and not from_template:
            from_image = DEFAULT_BASE_IMAGE
        steps = tuple(_step(i, s) for i, s in enumerate(body.get("steps") or []))
        return cls(from_image=_opt_str(from_image, "fromImage"), from_template=_opt_str(from_template, "fromTemplate"),
                   steps=steps, start_cmd=_opt_str(body.get("startCmd"), "startCmd"),
                   ready_cmd=_opt_str(body.get("readyCmd"), "readyCmd"), force=bool(body.get("force")),
                   registry_auth=_registry(body.get("fromImageRegistry")))

    def base_description(self) -> str:
        return f"FROM {self.from_image}" if self.from_image else f"FROM template {self.from_template}"


def _opt_str(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SpecError(f"{name} must be a string")
    return value


def _step(index: int, raw: Any) -> Step:
    where = f"step {index + 1}"
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: must be an object")
    kind = str(raw.get("type", "")).upper()
    if kind not in STEP_TYPES:
        raise SpecError(f"{where}: unsupported step type {raw.get('type')!r} (supported: {', '.join(STEP_TYPES)})")
    args = raw.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SpecError(f"{where}: args must be a list of strings")
    files_hash = raw.get("filesHash")
    _check_args(where, kind, args, files_hash)
    return Step(type=kind, args=tuple(args), force=bool(raw.get("force")), files_hash=files_hash)


def _check_args(where: str, kind: str, args: list[str], files_hash: Any) -> None:
    minimum = {"COPY": 2, "ENV": 2, "RUN": 1, "WORKDIR": 1, "USER": 1}[kind]
    if len(args) < minimum:
        raise SpecError(f"{where}: {kind} needs at least {minimum} argument(s)")
    if kind == "ENV" and len(args) % 2:
        raise SpecError(f"{where}: ENV needs key/value pairs")
    if kind == "COPY":
        if not isinstance(files_hash, str) or not _FILES_HASH.match(files_hash):
            raise SpecError(f"{where}: COPY needs a filesHash (hex sha256)")
        if len(args) > 3 and args[3] and not re.fullmatch(r"[0-7]{3,4}", args[3]):
            raise SpecError(f"{where}: COPY mode must be octal, got {args[3]!r}")
    if kind in ("RUN", "WORKDIR", "USER") and not args[0].strip():
        raise SpecError(f"{where}: {kind} argument is empty")


def _registry(raw: Any) -> RegistryAuth | None:
    if not raw:
        return None
    if not isinstance(raw, dict) or raw.get("type") != "registry":
        kind = raw.get("type") if isinstance(raw, dict) else raw
        raise SpecError(f"fromImageRegistry of type {kind!r} is not supported (only 'registry')")
    return RegistryAuth(username=str(raw.get("username", "")), password=str(raw.get("password", "")))
