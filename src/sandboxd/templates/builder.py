"""Build a template from a :class:`BuildSpec`: base, one cached layer per step, envd, publish.

Reads top to bottom:

1. **base** — FROM resolved to a verified directory (:mod:`sandboxd.templates.images`).
2. **steps** — each step's layer key is ``hash(parent key, step, verified COPY files, step code)``;
   a verified layer with that key is reused, otherwise the step runs on the stack so far and its
   changes become the layer (:mod:`sandboxd.templates.stepns`; a RUN step's command runs in a
   gVisor sandbox of its own, :mod:`sandboxd.templates.contained`). A forced step (``skip_cache``) gets
   a fresh key, and so does everything after it.
3. **finalize** — the envd bundle is stacked on top as its own cached layer (so every template,
   whatever its base, runs the current envd), the stack is flattened into a new build in the
   :class:`TemplateStore`, and the build is published only if envd answers ``/health`` in it.

The build id hashes every layer's key *and* content checksum, the envd bundle and the runtime
config: any changed input gives a new id, and so does a step that produced different bytes from
the same inputs (``RUN date``), so no id ever names two different trees (seed 000).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandboxd.config import Settings
from sandboxd.envd.contract import BUNDLE_PATH_IN_SANDBOX
from sandboxd.templates.check import check_envd_starts
from sandboxd.templates.contained import StepSandbox
from sandboxd.templates.envd_bundle import build_envd_bundle, bundle_hash
from sandboxd.templates.files import FilesCache, FilesError
from sandboxd.templates.images import BaseRootfs, ImageError, resolve_base
from sandboxd.templates.layers import Layer, LayerCache, layer_key, mark_opaque, read_from_stack
from sandboxd.templates.spec import BuildSpec, Step
from sandboxd.templates.stepns import run_step
from sandboxd.templates.steps import BuildState, code_hash, home_of, next_state, step_op
from sandboxd.templates.store import Build, BuildError, BuildInputs, TemplateStore

#: ``emit(level, message, step)``: level is debug/info/warn/error; step is ``base``, ``1``..``n``
#: (1-based, as the SDK maps steps to its stack traces) or ``finalize``.
Emit = Callable[[str, str, "str | None"], None]
RECIPE_FORMAT = "sandboxd-custom-template-1"


class StepFailed(RuntimeError):
    """A build failed at ``step``; ``output`` is the tail of what the step printed."""

    def __init__(self, step: str, message: str, output: list[str] | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.message = message
        self.output = output or []

    def __str__(self) -> str:
        tail = "\n".join(self.output[-20:])
        return f"{self.message}\n{tail}" if tail else self.message


@dataclass(frozen=True)
class BuildResult:
    build: Build
    steps: int
    cached_steps: int
    seconds: float
    runtime: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Stack:
    """The layers so far (bottom first) and the key of the top."""

    base: BaseRootfs
    layers: list[Layer] = field(default_factory=list)
    chain: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.chain[-1]["key"] if self.chain else self.base.key

    def lowers(self) -> list[Path]:
        """Directories for overlayfs, top first, empty layers left out."""
        return [layer.diff for layer in reversed(self.layers) if not layer.empty] + [self.base.lower]


class TemplateBuilder:
    """Turns build specs into published, verified template builds."""

    def __init__(self, store: TemplateStore, layers: LayerCache, files: FilesCache, sandbox: StepSandbox, *,
                 find_template: Callable[[str], str | None] = lambda _: None,
                 envd_check: str = "health", step_timeout: float = 3600) -> None:
        self.store = store
        self.sandbox = sandbox
        self.layers = layers
        self.files = files
        self.find_template = find_template
        self.envd_check = envd_check
        self.step_timeout = step_timeout

    def build(self, spec: BuildSpec, emit: Emit) -> BuildResult:
        started = time.monotonic()
        envd_hash = bundle_hash()  # once per build: the base and the envd layer both need it
        stack = self._base(spec, envd_hash, emit)
        state, forced, hits = stack.base.state, spec.force, []
        total = len(spec.steps)
        for i, step in enumerate(spec.steps):
            forced = forced or step.force
            state, hit = self._step(stack, state, step, str(i + 1), total, forced, emit)
            if hit is not None:
                hits.append(hit)
        build, runtime = self._finalize(spec, stack, state, envd_hash, emit)
        seconds = time.monotonic() - started
        emit("info", f"build {build.build_id} ready in {seconds:.1f}s "
                     f"({sum(hits)}/{len(hits)} layers from the cache)", "finalize")
        return BuildResult(build, total, sum(hits), seconds, runtime)

    # -- base ----------------------------------------------------------------------------------

    def _base(self, spec: BuildSpec, envd_hash: str, emit: Emit) -> _Stack:
        emit("info", f"[base] {spec.base_description()}", "base")
        try:
            base = resolve_base(spec, self.store, self.layers, self.find_template,
                                lambda m: emit("info", m, "base"), envd_hash)
        except (ImageError, BuildError, OSError) as exc:
            raise StepFailed("base", f"base image: {exc}") from exc
        return _Stack(base)

    # -- steps ---------------------------------------------------------------------------------

    def _step(self, stack: _Stack, state: BuildState, step: Step, name: str, total: int, forced: bool,
              emit: Emit) -> tuple[BuildState, bool | None]:
        """Apply one step; return the new state and whether its layer came from the cache (None:
        the step only changes state, it has no layer)."""
        t0 = time.monotonic()
        head = f"[{name}/{total}] {step.describe()}"
        emit("info", head, name)
        after, op = self._plan(stack, state, step, name, head, emit)
        key = layer_key("step", code_hash(), stack.key, step.identity(), secrets.token_hex(16) if forced else None)
        if op is None:
            stack.chain.append({"step": name, "key": key, "checksum": None})
            return after, None
        layer, hit = self.layers.create(
            key, lambda diff, work: self._run(stack, op, diff, work, name, step, emit),
            {"step": step.describe(), "parent": stack.key}, lambda m: emit("warn", m, name))
        stack.layers.append(layer)
        link: dict[str, Any] = {"step": name, "key": key, "checksum": layer.checksum}
        if step.files_hash:  # what `cache verify` needs to re-check the files against their hash
            link.update(filesHash=step.files_hash, copy=[step.args[0], step.args[1]])
        stack.chain.append(link)
        emit("info", f"{head}: {'CACHED' if hit else f'done in {time.monotonic() - t0:.1f}s'}", name)
        return after, hit

    def _plan(self, stack: _Stack, state: BuildState, step: Step, name: str, head: str,
              emit: Emit) -> tuple[BuildState, dict[str, Any] | None]:
        """The state after ``step`` and the filesystem op it needs (None: none)."""
        try:
            after = next_state(state, step, self._home(stack, state.user) or "/")
            tar = self._copy_files(step) if step.type == "COPY" else None
        except (ValueError, FilesError) as exc:
            emit("error", f"{head}: {exc}", name)
            raise StepFailed(name, f"step {name} ({step.describe()}) failed: {exc}") from exc
        if step.type == "USER" and self._home(stack, step.args[0], None) is not None:
            return after, None  # the user exists: nothing to create
        return after, step_op(step, state, after, tar)

    def _copy_files(self, step: Step) -> Path:
        assert step.files_hash is not None
        return self.files.verified(step.files_hash, step.args[0], step.args[1])

    def _home(self, stack: _Stack, user: str, default: str | None = "/") -> str | None:
        home = home_of(user, read_from_stack(stack.lowers(), "etc/passwd"))
        return home if home is not None else default

    def _run(self, stack: _Stack, op: dict[str, Any], diff: Path, work: Path, name: str, step: Step,
             emit: Emit) -> None:
        with tempfile.TemporaryDirectory(prefix="sandboxd-step-") as scratch:
            spec = {**op, "lowers": [str(p) for p in stack.lowers()], "upper": str(diff), "work": str(work),
                    "scratch": scratch}
            if op["op"] == "run":
                res = self.sandbox.run(spec, lambda line: emit("info", line, name))
            else:
                res = run_step(spec, lambda line: emit("info", line, name), self.step_timeout)
        if res.returncode != 0:
            emit("error", f"step {name} ({step.describe()}) exited with code {res.returncode}", name)
            raise StepFailed(name, f"step {name} ({step.describe()}) failed with exit code {res.returncode}",
                             res.tail)
        _drop_sockets(diff)

    # -- finalize ------------------------------------------------------------------------------

    def _finalize(self, spec: BuildSpec, stack: _Stack, state: BuildState, envd_hash: str,
                  emit: Emit) -> tuple[Build, dict[str, Any]]:
        """envd on top, then the store's build: flatten, gate, checksum, publish (or the cached,
        verified build when nothing changed)."""
        def log(msg: str) -> None:
            emit("info", msg, "finalize")

        try:
            envd = self._envd_layer(envd_hash, log)
        except (RuntimeError, OSError) as exc:
            raise StepFailed("finalize", f"finalize: injecting envd failed: {exc}") from exc
        runtime = {**state.to_json(), "workdir": state.workdir or self._home(stack, state.user),
                   "start_cmd": spec.start_cmd, "ready_cmd": spec.ready_cmd}
        lowers = [envd.diff, *stack.lowers()]
        try:
            build = self.store.build(self._inputs(stack, envd, envd_hash, runtime),
                                     lambda rootfs, blog: self._make_rootfs(lowers, rootfs, blog), log,
                                     extra_meta=_describe(stack, envd, runtime))
        except BuildError as exc:
            emit("error", str(exc), "finalize")
            raise StepFailed("finalize", f"finalize: {exc}") from exc
        return build, runtime

    def _inputs(self, stack: _Stack, envd: Layer, envd_hash: str, runtime: dict[str, Any]) -> BuildInputs:
        """Everything the build id covers: every layer's key and content, envd, runtime config."""
        recipe = {"format": RECIPE_FORMAT, "base": stack.base.key, "layers": stack.chain,
                  "envd_layer": {"key": envd.key, "checksum": envd.checksum}}
        return BuildInputs(name="custom", recipe=json.dumps(recipe, sort_keys=True), envd_bundle_hash=envd_hash,
                           extra=(("runtime", json.dumps(runtime, sort_keys=True)), ("envd_check", self.envd_check)))

    def _make_rootfs(self, lowers: list[Path], rootfs: Path, log: Callable[[str], None]) -> None:
        """Flatten the stack into the store's (unpublished) rootfs dir; refuse it unless envd
        starts in it exactly as a sandbox will start it."""
        log(f"flattening {len(lowers)} layers into the template's rootfs")
        with tempfile.TemporaryDirectory(prefix="sandboxd-flatten-") as scratch:
            res = run_step({"op": "flatten", "lowers": [str(p) for p in lowers], "scratch": scratch,
                            "dest": str(rootfs)}, log, self.step_timeout)
        if res.returncode != 0:
            raise RuntimeError("flattening the layers failed:\n" + "\n".join(res.tail))
        check_envd_starts(rootfs, log, level=self.envd_check)
        if make_ext4 := _ext4_maker():
            make_ext4(rootfs, rootfs.parent / "rootfs.ext4", log)  # inside the unpublished build dir

    def _envd_layer(self, envd_hash: str, log: Callable[[str], None]) -> Layer:
        """/opt/sandboxd as an opaque directory: whatever the base had there is hidden."""
        def make(diff: Path, _work: Path) -> None:
            dest = diff / BUNDLE_PATH_IN_SANDBOX.lstrip("/")
            got = build_envd_bundle(dest)
            if got != envd_hash:
                raise RuntimeError("envd sources changed during the build; build again")
            mark_opaque(dest)
            (diff / "opt").chmod(0o755)

        layer, hit = self.layers.create(layer_key("envd", envd_hash), make, {"envd_bundle": envd_hash}, log)
        log(f"envd bundle {envd_hash[:12]} {'from the layer cache' if hit else 'built'}")
        return layer


def _describe(stack: _Stack, envd: Layer, runtime: dict[str, Any]) -> dict[str, Any]:
    """meta.json's readable summary: runtime config, base, layers and COPY files (for gc/verify)."""
    return {"runtime": runtime, "from": {**stack.base.source, "key": stack.base.key},
            "layers": [c["key"] for c in stack.chain] + [envd.key],
            "files": [{"hash": c["filesHash"], "src": c["copy"][0], "dest": c["copy"][1]}
                      for c in stack.chain if c.get("filesHash")]}


def _drop_sockets(root: Path) -> None:
    """A daemon a RUN step started may leave its socket behind; sockets mean nothing in a
    template (and have no content to checksum)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if stat.S_ISSOCK(os.lstat(p).st_mode):
                os.unlink(p)


def _ext4_maker() -> Callable[[Path, Path, Callable[[str], None]], None] | None:
    """``sandboxd.templates.ext4.make_rootfs_ext4(rootfs_dir, image_path, log)`` when the microVM
    runtime's image maker is installed: the build then carries ``rootfs.ext4`` beside ``rootfs/``,
    made before publishing, so it is as immutable as the tree it was made from."""
    try:
        from sandboxd.templates import ext4
    except ImportError:
        return None
    return getattr(ext4, "make_rootfs_ext4", None)


def builder_for(data_dir: Path, find_template: Callable[[str], str | None] = lambda _: None,
                envd_check: str = "health", settings: Settings | None = None) -> TemplateBuilder:
    """The builder of one data dir: ``templates/`` (published builds), ``cache/layers/`` and
    ``cache/files/`` (derived data, verified on use, safe to delete). RUN steps get the network
    slots and limits of ``settings`` (default: the environment's, for this data dir)."""
    settings = settings or Settings.from_env(data_dir=data_dir)
    return TemplateBuilder(TemplateStore(data_dir / "templates"), LayerCache(data_dir / "cache" / "layers"),
                           FilesCache(data_dir / "cache" / "files"), StepSandbox.from_settings(settings),
                           find_template=find_template, envd_check=envd_check)
