"""``code-interpreter-v1``: the recipe, and the build ``serve`` runs in the background after ``base``.

The recipe is written with the e2b SDK's own ``Template`` builder, exactly as a user would extend
it (``Template().from_template("code-interpreter-v1")...``), and built by sandboxd's template
builder like any API build: cached layer by layer (the slow ``pip install`` comes first, the
server last, so a change to the server rebuilds seconds, not minutes), content-addressed, and
recorded as a build of the template (its log and status are served like any other build's).

While it builds, a create that names it gets a 503 with ``Retry-After`` that says how far the build
got (the SDK retries it), never a bare 404.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandboxd.config import Settings
from sandboxd.envd.contract import DEFAULT_USER, DEFAULT_WORKDIR
from sandboxd.store.db import Database
from sandboxd.store.templates_db import DEFAULT_TAG, BuildResources, TemplateBuilds
from sandboxd.templates.builder import StepFailed, builder_for
from sandboxd.templates.dockerfile import cache_context_files
from sandboxd.templates.spec import BuildSpec

log = logging.getLogger("sandboxd.interpreter")

NAME = "code-interpreter-v1"
PORT = 49999
CONTEXT = Path(__file__).parent  # the COPY steps' context: server/ (see .dockerignore)
SERVER_DIR = "/opt/sandboxd-interpreter"
SITE_PACKAGES = "/usr/local/lib/python3.11/dist-packages"  # Debian bookworm's python3, pip as root
#: What E2B's image preinstalls that people reach for first, plus the kernels and the server's own.
PYTHON_PACKAGES = (
    "numpy", "pandas", "matplotlib", "scipy", "seaborn", "requests", "pillow", "openpyxl", "beautifulsoup4",
    "sympy", "ipykernel", "jupyter_client", "bash_kernel", "e2b-charts==1.0.0", "starlette", "uvicorn", "deno",
)
#: Kernels and pandas/matplotlib want more than the server's default sandbox memory.
MEMORY_MB = 1024


def recipe() -> Any:
    """The template, as the e2b SDK's ``TemplateBuilder``."""
    from e2b import Template, wait_for_port

    with contextlib.redirect_stdout(sys.stderr):
        return (
            Template(file_context_path=str(CONTEXT))
            .from_template("base")
            .pip_install(list(PYTHON_PACKAGES))
            .run_cmd(["python3 -m bash_kernel.install --sys-prefix", "MPLBACKEND=Agg python3 -c 'import matplotlib.pyplot'"],
                     user="root")
            .run_cmd("deno jupyter --install --force", user=DEFAULT_USER)
            .copy("server/sandboxd_display.py", f"{SITE_PACKAGES}/sandboxd_display.py")
            .copy("server", f"{SERVER_DIR}/server")
            .set_user(DEFAULT_USER)
            .set_workdir(DEFAULT_WORKDIR)
            .set_start_cmd(f"cd {SERVER_DIR} && exec python3 -m server", wait_for_port(PORT))
        )


def build_spec() -> BuildSpec:
    """The recipe as the build request the SDK would send (``Template.to_json``)."""
    import json

    from e2b import Template

    return BuildSpec.from_json(json.loads(Template.to_json(recipe())))


# -- the background build ------------------------------------------------------------------------


class BackgroundBuild:
    """One build of the template in a thread of its own, recorded like an API build."""

    def __init__(self, settings: Settings, db: Database, echo: Callable[[str], None]) -> None:
        self.settings = settings
        self.builds = TemplateBuilds(db)
        self.echo = echo
        self.thread: threading.Thread | None = None

    def start(self) -> str:
        """Record the build and start it; returns its build (request) id."""
        row = self.builds.new_build(NAME, [DEFAULT_TAG], BuildResources(memory_mb=MEMORY_MB))
        self.builds.set_status(row.build_id, "building")
        self.thread = threading.Thread(target=self._run, args=(row.build_id,), name="build-code-interpreter",
                                       daemon=True)
        self.thread.start()
        return row.build_id

    def _run(self, build_id: str) -> None:
        started = time.monotonic()

        def emit(level: str, message: str, step: str | None) -> None:
            self.builds.add_log(build_id, level, message, step)
            if message.startswith("[") or level == "error" or step == "finalize":
                self.echo(f"{NAME}: {message.splitlines()[0] if message else ''}")

        try:
            builder = builder_for(self.settings.data_dir, find_template=self.builds.resolve,
                                  settings=self.settings)
            spec = build_spec()
            cache_context_files(spec, CONTEXT, builder.files)
            result = builder.build(spec, emit)
            self.builds.publish(build_id, result.build.build_id, self.settings.runtime)
            self.echo(f"{NAME}: ready ({result.cached_steps}/{result.steps} steps cached, "
                      f"{time.monotonic() - started:.0f}s)")
        except StepFailed as exc:
            self._fail(build_id, str(exc), exc.step)
        except Exception as exc:  # noqa: BLE001 - the build must end as error, whatever happened
            log.exception("%s build failed", NAME)
            self._fail(build_id, f"{type(exc).__name__}: {exc}", None)

    def _fail(self, build_id: str, message: str, step: str | None) -> None:
        self.builds.add_log(build_id, "error", message, step)
        self.builds.set_status(build_id, "error", reason=message, step=step)
        self.echo(f"{NAME}: build failed at step {step}: {message.splitlines()[0] if message else ''}")


def start_builtin_builds(settings: Settings, db: Database, echo: Callable[[str], None]) -> list[BackgroundBuild]:
    """The built-in templates ``settings.builtin_templates`` names, each building in the background."""
    wanted = [n.strip() for n in settings.builtin_templates.split(",") if n.strip()]
    unknown = [n for n in wanted if n != NAME]
    if unknown:
        raise ValueError(f"builtin_templates: unknown template(s) {', '.join(unknown)} (known: {NAME})")
    started = []
    for _ in wanted:
        job = BackgroundBuild(settings, db, echo)
        job.start()
        started.append(job)
    return started

