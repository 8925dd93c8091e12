"""Self-contained envd runtime ("the bundle") injected into every template at /opt/sandboxd.

Why a bundle: envd must run in any rootfs, including one with no Python and no libc (seed 000:
envd did not start in the guest). So the bundle carries its own CPython, a pruned stdlib, the few
distributions envd imports, every shared library they need *and* the dynamic loader. envd is
started through that loader explicitly (``ld-linux --library-path /opt/sandboxd/lib python3``), so
neither the template's libc nor an ``LD_LIBRARY_PATH`` (which would leak into user processes) is
involved.

Layout (POSIX prefix layout, so CPython finds its stdlib from bin/python3 alone, no PYTHONHOME)::

    bin/python3  bin/tini  bin/as-user
    lib/ld-linux-x86-64.so.2  lib/libc.so.6  lib/libpython3.11.so.1.0 ...
    lib/python3.11/{stdlib..., lib-dynload/, site-packages/{sandboxd/, h11/, ...}}

The bundle's identity (:func:`bundle_hash`) is a sha256 over sorted paths, modes and bytes of every
file except ``*.pyc`` (bytecode is derived from the hashed sources; marshal output is not
byte-reproducible, and including it would give every build a new template id). It is part of every
template's build id, so a changed envd can never be served from an old template.
"""

from __future__ import annotations

import compileall
import hashlib
import importlib.metadata as md
import os
import py_compile
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sandboxd
from sandboxd.envd.contract import BUNDLE_PATH_IN_SANDBOX, LOADER_NAME

TINI_SOURCE = Path("/usr/bin/tini-static")
AS_USER_SOURCE = Path(__file__).with_name("as_user.c")
FORMAT_VERSION = "envd-bundle-2"  # 2: bytecode compiled for -OO

#: Distributions envd imports; their runtime requirements are added by :func:`resolve_distributions`.
ENVD_DISTRIBUTIONS: tuple[str, ...] = (
    "h11",
    "connectrpc",
    "protobuf-py",
    "protobuf-py-ext",
    "typing_extensions",
)

# Stdlib parts envd never needs: tests, GUIs, build machinery, docs data.
_STDLIB_PRUNE_DIRS = frozenset(
    {
        "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
        "distutils", "site-packages", "dist-packages", "__pycache__", "venv", "curses", "sqlite3",
    }
)
_STDLIB_PRUNE_FILES = frozenset({"turtle.py", "pydoc.py", "doctest.py", "__phello__.foo.py"})
_STDLIB_PRUNE_PREFIXES = ("config-",)  # config-3.11-x86_64-linux-gnu holds the static libpython
_DYNLOAD_PRUNE = re.compile(
    r"^(_test|_ctypes_test|_xxtestfuzz|_xxsubinterpreters|xxlimited|_tkinter|_curses|"
    r"readline|nis|ossaudiodev|spwd|audioop|_sqlite3|_dbm|_gdbm)"
)
# glibc dlopen()s libgcc_s for pthread_exit/pthread_cancel (interpreter shutdown with threads);
# ldd does not show it, so it is always added when the host has it.
_ALWAYS_LIBS = ("libgcc_s.so.1",)


@dataclass(frozen=True)
class PlanEntry:
    """One file of the bundle: where it goes, where it comes from, with which mode."""

    rel: str
    source: Path
    mode: int


# ---------------------------------------------------------------------------------------------
# Planning: which files make up the bundle.


def _python_binary() -> Path:
    """The real (non-venv) interpreter binary behind ``sys.base_prefix``."""
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (Path(sys.base_prefix) / "bin" / ver, Path(sys._base_executable)):  # type: ignore[attr-defined]  # noqa: SLF001
        if cand.exists():
            return cand.resolve()
    raise FileNotFoundError(f"no python binary under {sys.base_prefix}")


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths(vars={"installed_base": sys.base_prefix, "base": sys.base_prefix})["stdlib"])


def _dynload_dir() -> Path:
    return Path(sysconfig.get_config_var("DESTSHARED") or (_stdlib_dir() / "lib-dynload"))


def _pylib_rel() -> str:
    return f"lib/python{sys.version_info.major}.{sys.version_info.minor}"


def _mode(p: Path) -> int:
    """Normalised mode: executables 0755, everything else 0644 (host umask/ownership quirks must
    not change the bundle's identity)."""
    return 0o755 if os.stat(p).st_mode & 0o111 else 0o644


def _plan_stdlib(stdlib: Path) -> list[PlanEntry]:
    """Pure-Python stdlib, pruned of the parts envd never imports."""
    out: list[PlanEntry] = []
    base = _pylib_rel()
    for dirpath, dirnames, filenames in os.walk(stdlib):
        d = Path(dirpath)
        dirnames[:] = sorted(
            n for n in dirnames
            if n not in _STDLIB_PRUNE_DIRS and not n.startswith(_STDLIB_PRUNE_PREFIXES) and n != "lib-dynload"
        )
        for name in sorted(filenames):
            if name in _STDLIB_PRUNE_FILES or name.endswith((".pyc", ".pyo", ".exe")):
                continue
            src = d / name
            if src.is_symlink() or not src.is_file():
                continue
            out.append(PlanEntry(f"{base}/{src.relative_to(stdlib).as_posix()}", src, _mode(src)))
    return out


def _plan_dynload() -> list[PlanEntry]:
    dyn = _dynload_dir()
    base = f"{_pylib_rel()}/lib-dynload"
    return [
        PlanEntry(f"{base}/{p.name}", p, 0o755)
        for p in sorted(dyn.iterdir())
        if p.is_file() and p.suffix == ".so" and not _DYNLOAD_PRUNE.match(p.name)
    ]


def _requirement_names(dist: md.Distribution) -> list[str]:
    """Runtime (non-extra) requirements of ``dist`` whose markers hold on this interpreter."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - pip always vendors packaging
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[assignment]
    names = []
    for spec in dist.requires or []:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        names.append(req.name)
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve_distributions(roots: tuple[str, ...] = ENVD_DISTRIBUTIONS) -> list[md.Distribution]:
    """``roots`` plus their runtime dependency closure, as installed next to sandboxd."""
    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        dist = md.distribution(name)
        seen[name] = dist
        todo.extend(_requirement_names(dist))
    return [seen[k] for k in sorted(seen)]


def _plan_distribution(dist: md.Distribution) -> list[PlanEntry]:
    """Installed files of one distribution that live inside site-packages (RECORD based)."""
    site = f"{_pylib_rel()}/site-packages"
    out = []
    for f in dist.files or []:
        rel = f.as_posix()
        if rel.startswith("..") or "__pycache__" in rel or rel.endswith(".pyc"):
            continue
        src = Path(str(f.locate()))
        if not src.is_file():
            continue
        if ".dist-info/" in rel and not rel.endswith(("/METADATA", "/top_level.txt", "/entry_points.txt")):
            continue  # RECORD/INSTALLER/licences/sboms: not needed at run time
        out.append(PlanEntry(f"{site}/{rel}", src, _mode(src)))
    return out


def _plan_sandboxd() -> list[PlanEntry]:
    """``sandboxd/__init__.py`` + ``sandboxd/envd/`` as they are right now (nothing else of the
    control plane goes into sandboxes)."""
    pkg = Path(sandboxd.__file__).parent
    site = f"{_pylib_rel()}/site-packages/sandboxd"
    out = [PlanEntry(f"{site}/__init__.py", pkg / "__init__.py", 0o644)]
    envd = pkg / "envd"
    for dirpath, dirnames, filenames in os.walk(envd):
        dirnames[:] = sorted(n for n in dirnames if n != "__pycache__")
        for name in sorted(filenames):
            src = Path(dirpath) / name
            if name.endswith((".pyc", ".pyo")) or not src.is_file():
                continue
            out.append(PlanEntry(f"{site}/{src.relative_to(pkg).as_posix()}", src, _mode(src)))
    return out


def _ldd(path: Path) -> dict[str, Path]:
    """soname → resolved host path for the dynamic dependencies of one ELF file."""
    res = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    deps: dict[str, Path] = {}
    for line in res.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            name, _, rest = line.partition("=>")
            target = rest.strip().split(" (")[0].strip()
            if target == "not found":
                raise RuntimeError(f"{path}: shared library {name.strip()} not found")
            if target.startswith("/"):
                deps[name.strip()] = Path(target)
    return deps


def _host_loader() -> Path:
    for cand in (Path("/lib64") / LOADER_NAME, Path("/lib/x86_64-linux-gnu") / LOADER_NAME):
        if cand.exists():
            return cand
    raise FileNotFoundError(LOADER_NAME)


def _find_host_lib(soname: str) -> Path | None:
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"):
        p = Path(d) / soname
        if p.exists():
            return p
    return None


def _plan_libs(elves: list[Path]) -> list[PlanEntry]:
    """The shared-library closure of every ELF in the bundle, plus the loader, into ``lib/``."""
    libs: dict[str, Path] = {}
    for elf in elves:
        libs.update(_ldd(elf))
    for soname in _ALWAYS_LIBS:
        if soname not in libs and (p := _find_host_lib(soname)):
            libs[soname] = p
    libs[LOADER_NAME] = _host_loader()
    return [PlanEntry(f"lib/{name}", path.resolve(), 0o755) for name, path in sorted(libs.items())]


def build_as_user() -> Path:
    """envd's ``as-user`` (see as_user.c: starting a command as a user without forking envd),
    compiled once per source version (static, no libc; gcc gives the same bytes each time, so
    the bundle's hash stays stable)."""
    digest = hashlib.sha256(AS_USER_SOURCE.read_bytes()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / "sandboxd-native" / f"as-user-{digest}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        try:
            subprocess.run(["gcc", "-O2", "-static", "-nostdlib", "-ffreestanding", "-fno-stack-protector",
                            "-fno-builtin", "-o", str(tmp), str(AS_USER_SOURCE)], check=True,
                           capture_output=True, text=True)
        except FileNotFoundError as exc:
            raise RuntimeError("gcc is needed to build envd's as-user helper: apt-get install -y gcc") from exc
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"building envd's as-user helper failed: {exc.stderr.strip()}") from exc
        os.rename(tmp, out)
    return out


def _is_elf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"\x7fELF"


def bundle_plan() -> list[PlanEntry]:
    """Every file of the bundle, sorted by destination path."""
    binary = _python_binary()
    plan = [PlanEntry("bin/python3", binary, 0o755)]
    if not TINI_SOURCE.exists():
        raise FileNotFoundError(f"{TINI_SOURCE} missing: apt-get install -y tini")
    plan.append(PlanEntry("bin/tini", TINI_SOURCE, 0o755))
    plan.append(PlanEntry("bin/as-user", build_as_user(), 0o755))
    plan += _plan_stdlib(_stdlib_dir())
    plan += _plan_dynload()
    for dist in resolve_distributions():
        plan += _plan_distribution(dist)
    plan += _plan_sandboxd()
    elves = [e.source for e in plan if e.rel != "bin/tini" and (e.rel.endswith(".so") or e.rel == "bin/python3")]
    elves = [e for e in elves if _is_elf(e)]
    plan += _plan_libs(elves)
    # Dedupe by destination (last one wins would hide conflicts: fail loudly instead).
    by_rel: dict[str, PlanEntry] = {}
    for e in plan:
        if e.rel in by_rel and by_rel[e.rel].source != e.source:
            raise RuntimeError(f"bundle conflict at {e.rel}: {by_rel[e.rel].source} vs {e.source}")
        by_rel[e.rel] = e
    return [by_rel[k] for k in sorted(by_rel)]


# ---------------------------------------------------------------------------------------------
# Hashing and building.


def _hash_entry(h: hashlib._Hash, rel: str, mode: int, data_path: Path) -> None:
    h.update(f"{rel}\0{mode:o}\0".encode())
    fh = hashlib.sha256()
    with open(data_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            fh.update(chunk)
    h.update(fh.digest())


def plan_hash(plan: list[PlanEntry]) -> str:
    """Identity of a bundle before it is built (same value :func:`tree_hash` gives after)."""
    h = hashlib.sha256(FORMAT_VERSION.encode() + b"\0")
    for e in plan:
        _hash_entry(h, e.rel, e.mode, e.source)
    return h.hexdigest()


def bundle_hash() -> str:
    """Identity of the bundle that :func:`build_envd_bundle` would build right now (cheap: reads,
    does not copy)."""
    return plan_hash(bundle_plan())


def tree_hash(root: Path) -> str:
    """Identity of a built bundle directory: sorted paths, modes and bytes, ``*.pyc`` excluded."""
    h = hashlib.sha256(FORMAT_VERSION.encode() + b"\0")
    files = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if not name.endswith(".pyc"):
                files.append(Path(dirpath) / name)
    for p in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        _hash_entry(h, p.relative_to(root).as_posix(), stat.S_IMODE(os.lstat(p).st_mode), p)
    return h.hexdigest()


def _compile(dest: Path) -> None:
    """Precompile everything once at build time; unchecked-hash pycs are never re-validated at
    import (the bundle is immutable), which keeps envd's start fast on a read-only lower layer.
    Compiled for ``-OO`` (``*.opt-2.pyc``), the level every bundle python runs at (contract)."""
    ok = compileall.compile_dir(
        str(dest / _pylib_rel()), quiet=2, workers=0, ddir=f"{BUNDLE_PATH_IN_SANDBOX}/{_pylib_rel()}",
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH, optimize=2,
    )
    if not ok:
        # Some stdlib/site files are templates or py2 leftovers; only envd itself must compile.
        envd = dest / _pylib_rel() / "site-packages" / "sandboxd"
        if not compileall.compile_dir(str(envd), quiet=1, force=True, optimize=2):
            raise RuntimeError("sandboxd.envd does not compile")


def build_envd_bundle(dest: Path) -> str:
    """Build the bundle into the empty or absent directory ``dest``; return its content hash.

    Fails if the sources changed while copying (sandboxd/envd is edited concurrently), so the
    returned hash always describes exactly what was built."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty")
    plan = bundle_plan()
    expected = plan_hash(plan)
    for e in plan:
        target = dest / e.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(e.source, target)
        os.chmod(target, e.mode)
    _compile(dest)
    for dirpath, dirnames, _ in os.walk(dest):
        for n in dirnames:
            os.chmod(Path(dirpath) / n, 0o755)
    os.chmod(dest, 0o755)
    got = tree_hash(dest)
    if got != expected:
        raise RuntimeError("bundle sources changed while building; build again")
    return got
