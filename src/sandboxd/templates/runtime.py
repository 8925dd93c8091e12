"""What a build asks of the sandboxes started from it: env, default user and workdir, start and
ready commands (ENV/USER/WORKDIR and ``set_start_cmd`` of the template).

Read from the build's inputs (``meta["inputs"]["extra"]``), which its id covers, so a sandbox
can only ever get the runtime config its build id names. Builds that predate custom templates
(``base``, ``tiny``) get E2B's defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sandboxd.envd.contract import DEFAULT_USER, DEFAULT_WORKDIR
from sandboxd.templates.store import Build


@dataclass(frozen=True)
class RuntimeConfig:
    env: dict[str, str] = field(default_factory=dict)
    user: str = DEFAULT_USER
    workdir: str = DEFAULT_WORKDIR
    start_cmd: str | None = None
    ready_cmd: str | None = None

    @classmethod
    def of(cls, build: Build) -> RuntimeConfig:
        extra = dict(tuple(kv) for kv in build.meta.get("inputs", {}).get("extra", []))
        if "runtime" not in extra:
            return cls()
        raw = json.loads(extra["runtime"])
        return cls(env=dict(raw.get("env") or {}), user=raw.get("user") or DEFAULT_USER,
                   workdir=raw.get("workdir") or DEFAULT_WORKDIR, start_cmd=raw.get("start_cmd"),
                   ready_cmd=raw.get("ready_cmd"))
