"""``sandboxd template build``: a Dockerfile built in this process, with progress on the terminal.

The build is recorded like an API build (request row, log entries, tags), so the template name,
its tags and ``GET .../status`` behave the same whichever way a template was built.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from e2b.exceptions import SandboxException

from sandboxd.config import Settings
from sandboxd.store.db import Database
from sandboxd.store.templates_db import DEFAULT_TAG, TemplateBuilds, split_name
from sandboxd.templates.builder import StepFailed, builder_for
from sandboxd.templates.dockerfile import cache_context_files, spec_from_dockerfile


class Progress:
    """Log entries → terminal lines: elapsed time, step headers as they are, step output
    indented under its step."""

    def __init__(self, echo: Callable[[str], None], record: Callable[[str, str, str | None], None]) -> None:
        self.echo = echo
        self.record = record
        self.t0 = time.monotonic()

    def __call__(self, level: str, message: str, step: str | None) -> None:
        self.record(level, message, step)
        header = message.startswith("[") or step in ("base", "finalize")
        prefix = "" if header else "    | "
        mark = "ERROR " if level == "error" else ""
        for line in message.splitlines() or [""]:
            self.echo(f"{time.monotonic() - self.t0:6.1f}s {mark}{prefix}{line}")


def build_from_dockerfile(settings: Settings, dockerfile: Path, context: Path, name: str, *,
                          no_cache: bool, echo: Callable[[str], None]) -> str | None:
    """Build, point ``name`` (and its tag) at the result, return the build id; None on failure
    (the failed step and its output have been printed)."""
    builds = TemplateBuilds(Database(settings.db_url))
    builder = builder_for(settings.data_dir, find_template=builds.resolve)
    try:
        spec = spec_from_dockerfile(dockerfile, context)
        written = cache_context_files(spec, context, builder.files)
    except (ValueError, OSError, SandboxException) as exc:  # syntax, unsupported instruction, no such file
        echo(f"cannot build {dockerfile}: {exc}")
        return None
    if no_cache:
        spec = replace(spec, force=True)
    echo(f"{len(spec.steps)} steps from {dockerfile}; {written} COPY context(s) packed from {context}")
    alias, tag = split_name(name)
    row = builds.new_build(alias, [tag or DEFAULT_TAG])
    builds.set_status(row.build_id, "building")
    progress = Progress(echo, lambda level, msg, step: builds.add_log(row.build_id, level, msg, step))
    try:
        result = builder.build(spec, progress)
    except StepFailed as exc:
        builds.set_status(row.build_id, "error", reason=str(exc), step=exc.step)
        echo(f"build failed at step {exc.step}: {exc.message}")
        for line in exc.output[-20:]:
            echo(f"    | {line}")
        return None
    builds.publish(row.build_id, result.build.build_id, settings.runtime)
    echo(f"template {name} → build {result.build.build_id}")
    return result.build.build_id
