"""``sandboxd template build``: a Dockerfile built in this process, with progress on the terminal.

The build is recorded like an API build (request row, log entries, tags), so the template name,
its tags and ``GET .../status`` behave the same whichever way a template was built.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Callable, Iterator
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


class LiveProgress:
    """The same log entries as a live display on a terminal (rich): a bar of the steps done, how
    many came from the layer cache, the step running now and the time; each step's output and
    the build's own messages scroll above it."""

    _HEAD = re.compile(r"^\[(\d+)/(\d+)\] ")

    def __init__(self, progress: object, task: object, record: Callable[[str, str, str | None], None]) -> None:
        self.progress, self.task, self.record = progress, task, record
        self.hits = 0

    def __call__(self, level: str, message: str, step: str | None) -> None:
        from rich.markup import escape

        self.record(level, message, step)
        p, task = self.progress, self.task
        say = p.console.print  # type: ignore[attr-defined]
        head = self._HEAD.match(message)
        if head:  # "[i/n] STEP": steps before i are done (a step without a layer says nothing else)
            number = int(head.group(1))
            cached = message.endswith(": CACHED")
            finished = cached or ": done in " in message
            self.hits += cached
            p.update(task, completed=number if finished else number - 1, hits=self.hits,  # type: ignore[attr-defined]
                     now="" if finished else escape(message[:60]))
            style = "green" if cached else "bold" if finished else "red" if level == "error" else ""
            say(f"[{style}]{escape(message)}[/]" if style else escape(message), highlight=False)
        elif step in ("base", "finalize"):
            if step == "finalize":
                p.update(task, completed=p.tasks[0].total, now="")  # type: ignore[attr-defined]
            say(escape(message) if level != "error" else f"[red]{escape(message)}[/]", highlight=False)
        else:
            for line in message.splitlines() or [""]:
                say(f"[dim]    | {escape(line)}[/]", highlight=False)


@contextlib.contextmanager
def _progress_display(steps: int, echo: Callable[[str], None],
                      record: Callable[[str, str, str | None], None]) -> Iterator[Callable[[str, str, str | None], None]]:
    """A live display when stderr is a terminal, plain timestamped lines otherwise (logs, CI)."""
    if not sys.stderr.isatty():
        yield Progress(echo, record)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    columns = (SpinnerColumn(), TextColumn("steps"), BarColumn(), MofNCompleteColumn(),
               TextColumn("[green]{task.fields[hits]} cached[/]"), TimeElapsedColumn(), TextColumn("{task.fields[now]}"))
    with RichProgress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("build", total=steps, hits=0, now="")
        yield LiveProgress(progress, task, record)


#: Base build messages → how far along it is (debootstrap's own percentage fills the first 85%).
_BASE_PHASES = (("configuring user", 88), ("envd bundle", 90), ("envd check:", 93), ("checksumming rootfs", 96),
                ("built in", 100), ("cached build", 100))
_DEBOOTSTRAP = re.compile(r"^debootstrap \[\s*(?:(\d+)%|(\d+) pkgs)\]")


@contextlib.contextmanager
def base_build_display(echo: Callable[[str], None]) -> Iterator[Callable[[str], None]]:
    """The base template's build (``serve``'s first start, ``template build-base``) as a live bar
    on a terminal: debootstrap's progress, then the configuration, envd check and checksum; every
    message scrolls above it. Not a terminal: the messages as plain lines."""
    if not sys.stderr.isatty():
        yield echo
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    columns = (SpinnerColumn(), TextColumn("base template"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn(), TextColumn("{task.fields[now]}"))
    with RichProgress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("base", total=100, now="")

        def log(message: str) -> None:
            if m := _DEBOOTSTRAP.match(message):
                now = f"debootstrap: {m.group(2)} packages downloaded" if m.group(2) else message[:60]
                progress.update(task, completed=int(m.group(1) or 0) * 85 // 100, now=escape(now))
            for marker, percent in _BASE_PHASES:
                if marker in message:
                    progress.update(task, completed=percent, now="" if percent == 100 else escape(marker))
            progress.console.print(escape(message), highlight=False)

        yield log


def build_from_dockerfile(settings: Settings, dockerfile: Path, context: Path, name: str, *,
                          no_cache: bool, echo: Callable[[str], None]) -> str | None:
    """Build, point ``name`` (and its tag) at the result, return the build id; None on failure
    (the failed step and its output have been printed)."""
    builds = TemplateBuilds(Database(settings.db_url))
    builder = builder_for(settings.data_dir, find_template=builds.resolve, settings=settings)
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
    record = lambda level, msg, step: builds.add_log(row.build_id, level, msg, step)  # noqa: E731
    try:
        with _progress_display(len(spec.steps), echo, record) as progress:
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
