"""The envd bundle runs in a rootfs with no libc and no Python of its own (seed 000: envd did not
start in the guest), with a clean environment for the processes it starts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sandboxd.envd import contract
from sandboxd.templates import envd_bundle as eb
from sandboxd.templates.base import build_tiny
from sandboxd.templates.check import envd_health, run_in_rootfs
from sandboxd.templates.store import Build, TemplateStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(store: TemplateStore, log) -> Build:
    """The tiny template gated only on "bundled python starts" (its own build id), so the
    bundle tests below run even while envd is incomplete."""
    return build_tiny(store, log, envd_check="python")


def test_tiny_has_no_python_and_no_libc(tiny: Build):
    r = tiny.rootfs
    outside_bundle = [p for p in r.rglob("*") if not p.is_relative_to(r / "opt")]
    names = {p.name for p in outside_bundle}
    assert not any(n.startswith(("python", "libc.so", "ld-linux", "libpython")) for n in names)
    assert not (r / "lib").exists() and not (r / "lib64").exists()
    assert (r / "opt/sandboxd/bin/python3").is_file()


def test_bundled_python_runs_in_tiny(tiny: Build):
    code = ("import sys, ssl, json, asyncio, threading, subprocess, pwd; "
            "import h11, connectrpc, protobuf, protobuf_ext, typing_extensions; "
            "print(sys.prefix); print(sys.flags.isolated, sys.flags.dont_write_bytecode)")
    res = run_in_rootfs(tiny.rootfs, contract.python_argv("-c", code))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [contract.BUNDLE_PATH_IN_SANDBOX, "1 1"]


def test_envd_argv_with_tini_runs_and_leaks_no_python_env(tiny: Build):
    """The exact PID-1 argv/env (with -c instead of -m sandboxd.envd): children see no PYTHON*."""
    argv = contract.envd_argv()
    assert argv[-2:] == ["-m", "sandboxd.envd"]
    code = ("import os, subprocess; "
            "print(subprocess.run(['/bin/sh', '-c', 'env'], capture_output=True, text=True).stdout)")
    res = run_in_rootfs(tiny.rootfs, [*argv[:-2], "-c", code], env=contract.envd_env())
    assert res.returncode == 0, res.stderr
    child_env = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    assert child_env["PATH"] == contract.DEFAULT_PATH
    assert not [k for k in child_env if k.startswith(("PYTHON", "LD_"))]


def test_envd_env_sets_path_and_no_loader_vars():
    env = contract.envd_env()
    assert "/usr/bin" in env["PATH"].split(":") and "/bin" in env["PATH"].split(":")
    assert not [k for k in env if k.startswith(("PYTHON", "LD_"))]


def test_python_start_time_in_tiny(tiny: Build, capsys):
    """`python -c pass` inside the bundle via chroot (namespace + overlay setup included)."""
    loops = 5
    inner = ("import subprocess, time; t=time.perf_counter(); "
             f"[subprocess.run({contract.python_argv('-c', 'pass')!r}) for _ in range({loops})]; "
             f"print((time.perf_counter()-t)/{loops})")
    res = run_in_rootfs(tiny.rootfs, contract.python_argv("-c", inner))
    assert res.returncode == 0, res.stderr
    per_start = float(res.stdout.strip())
    with capsys.disabled():
        print(f"\n[measure] bundled `python -c pass` inside tiny rootfs: {per_start * 1000:.1f} ms")
    assert per_start < 1.0


def test_bundle_hash_is_reproducible_and_matches_tree(tmp_path: Path):
    h = eb.build_envd_bundle(tmp_path / "b")
    assert h == eb.bundle_hash() == eb.tree_hash(tmp_path / "b")
    b = tmp_path / "b"
    lib = b / "lib" / "python3.11"
    for pruned in ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
                   "site-packages/pip", "site-packages/fastapi"):
        assert not (lib / pruned).exists(), pruned
    for needed in ("asyncio/__init__.py", "lib-dynload", "site-packages/sandboxd/__init__.py",
                   "site-packages/h11", "site-packages/protobuf_ext"):
        assert (lib / needed).exists(), needed
    for dropped in ("site-packages/uvicorn", "site-packages/click"):  # envd serves HTTP itself
        assert not (lib / dropped).exists(), dropped
    assert (lib / "site-packages/sandboxd/__pycache__").is_dir()  # precompiled
    assert (b / "lib" / contract.LOADER_NAME).is_file() and (b / "bin" / "tini").is_file()
    assert (b / "lib" / "libgcc_s.so.1").is_file()  # dlopen()ed by glibc for pthread_exit
    size = sum(p.stat().st_size for p in b.rglob("*") if p.is_file())
    print(f"[measure] bundle size {size / 1e6:.1f} MB")


def test_bundle_hash_changes_when_a_file_changes(tmp_path: Path):
    b = tmp_path / "b"
    h = eb.build_envd_bundle(b)
    f = b / "lib/python3.11/site-packages/sandboxd/__init__.py"
    f.write_text(f.read_text() + "\n# changed\n")
    assert eb.tree_hash(b) != h
    os.chmod(f, 0o755)
    assert eb.tree_hash(b) != h


def test_envd_answers_health_in_tiny(store: TemplateStore, log):
    """The production gate: build_tiny only publishes when envd answers GET /health; then the
    published rootfs answers again. Fails until sandboxd.envd exists and serves /health."""
    b = build_tiny(store, log)
    t0 = time.monotonic()
    res = envd_health(b.rootfs)
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"[measure] envd /health in tiny after {time.monotonic() - t0:.2f}s (incl. namespace setup)")


STUB_ENVD_MAIN = '''
"""Stand-in for sandboxd.envd used only by this test: asyncio streams answering /health 204."""
import asyncio

async def handle(reader, writer):
    head = await reader.readuntil(b"\\r\\n\\r\\n")
    status = b"204 No Content" if head.split(b" ", 2)[1] == b"/health" else b"404 Not Found"
    writer.write(b"HTTP/1.1 " + status + b"\\r\\ncontent-length: 0\\r\\nconnection: close\\r\\n\\r\\n")
    await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", 49983)
    async with server:
        await server.serve_forever()

print("stub envd starting", flush=True)
asyncio.run(main())
'''


def test_health_gate_passes_with_stand_in_envd_and_fails_without(tmp_path: Path, monkeypatch):
    """Proves the gate itself (tini + loader + bundled python + /health, in a no-libc rootfs)
    with a stand-in envd package, independent of the real envd's progress; and that a rootfs whose
    envd cannot start is rejected."""
    from sandboxd.templates.base import make_tiny_rootfs
    from sandboxd.templates.check import check_envd_starts

    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "__init__.py").write_text("")
    (stub / "__main__.py").write_text(STUB_ENVD_MAIN)
    site = f"{eb._pylib_rel()}/site-packages/sandboxd"
    real_plan = eb._plan_sandboxd

    def plan_with_stub() -> list[eb.PlanEntry]:
        keep = [e for e in real_plan() if not e.rel.startswith(f"{site}/envd/")]
        return keep + [eb.PlanEntry(f"{site}/envd/{p.name}", p, 0o644) for p in sorted(stub.iterdir())]

    monkeypatch.setattr(eb, "_plan_sandboxd", plan_with_stub)
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    make_tiny_rootfs(rootfs)
    eb.build_envd_bundle(rootfs / "opt" / "sandboxd")
    lines: list[str] = []
    check_envd_starts(rootfs, lines.append)
    assert "envd check: GET /health ok" in lines
    assert any("stub envd starting" in line for line in lines)  # envd's output is visible

    (stub / "__main__.py").write_text("raise SystemExit('envd: unknown flag --debug')\n")
    rootfs2 = tmp_path / "rootfs2"
    rootfs2.mkdir()
    make_tiny_rootfs(rootfs2)
    eb.build_envd_bundle(rootfs2 / "opt" / "sandboxd")
    lines2: list[str] = []
    with pytest.raises(RuntimeError, match="did not answer GET /health"):
        check_envd_starts(rootfs2, lines2.append, timeout=15)
    assert any("unknown flag --debug" in line for line in lines2)


def test_the_build_check_runs_the_rootfs_code_in_gvisor_never_on_the_host(tiny: Build, tmp_path: Path):
    """The envd check runs a built rootfs's own code (its loader honours the rootfs's
    /etc/ld.so.preload: a hostile build's way in). Contained, that code runs on gVisor's kernel,
    never the host's; chrooted (trusted rootfses only) it would run on the host's."""
    import shutil

    rootfs = tmp_path / "rootfs"
    shutil.copytree(tiny.rootfs, rootfs, symlinks=True)
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "etc/ld.so.preload").write_text("/opt/planted-by-the-build.so\n")
    code = "import os; print(os.uname().release)"
    res = run_in_rootfs(rootfs, contract.python_argv("-c", code), contained=True)
    assert "planted-by-the-build.so" in res.stderr  # the loader did read the build's preload list ...
    assert res.returncode == 0 and res.stdout.strip() != os.uname().release  # ... inside gVisor's kernel
    host = run_in_rootfs(rootfs, contract.python_argv("-c", code))
    assert host.stdout.strip() == os.uname().release  # the control: chrooted, it is the host's kernel
