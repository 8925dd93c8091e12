"""The base template: E2B conventions (user 1000, passwordless sudo, bash, python3), its own
network files, clean apt state, the envd bundle, and a cached build served only if it verifies."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sandboxd.envd.contract import BUNDLE_PATH_IN_SANDBOX, python_argv
from sandboxd.templates.base import DebootstrapProgress, apt_mirror, build_base
from sandboxd.templates.check import envd_health, run_in_rootfs
from sandboxd.templates.store import Build, TemplateStore


@pytest.fixture(scope="module")
def base(store: TemplateStore, log, content_check_level: str) -> Build:
    t0 = time.monotonic()
    b = build_base(store, log, envd_check=content_check_level)
    print(f"[measure] build_base ({content_check_level}) took {time.monotonic() - t0:.1f}s")
    return b


def sh(b: Build, script: str) -> str:
    res = run_in_rootfs(b.rootfs, ["/bin/bash", "-c", script])
    assert res.returncode == 0, f"{script}: {res.stdout} {res.stderr}"
    return res.stdout


@pytest.mark.slow
def test_user_1000_with_home_and_bash(base: Build):
    assert sh(base, "getent passwd user").strip() == "user:x:1000:1000::/home/user:/bin/bash"
    assert sh(base, "id -u user; id -g user").split() == ["1000", "1000"]
    assert sh(base, "stat -c %u:%g /home/user").strip() == "1000:1000"
    assert sh(base, "runuser -u user -- bash -c 'echo $HOME:$BASH_VERSION'").startswith("/home/user:5.")


@pytest.mark.slow
def test_login_shell_path_unchanged_without_forking_id(base: Build):
    """``bash -l`` (every commands.run) gets Debian's PATH for root and for user, and /etc/profile
    no longer runs ``id`` under bash (sh, which has no EUID, still does)."""
    root_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    user_path = "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
    assert sh(base, "env -i /bin/bash -l -c 'echo $PATH'").strip() == root_path
    assert sh(base, "env -i /usr/sbin/runuser -u user -- /bin/bash -l -c 'echo $PATH'").strip() == user_path
    assert sh(base, "env -i /usr/sbin/runuser -u user -- /bin/sh -l -c 'echo $PATH'").strip() == user_path
    assert "id -u" not in sh(base, "env -i /usr/sbin/runuser -u user -- /bin/bash -l -x -c true 2>&1")


@pytest.mark.slow
def test_passwordless_sudo(base: Build):
    res = run_in_rootfs(base.rootfs, ["runuser", "-u", "user", "--", "sudo", "-n", "id", "-u"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0"
    assert "unable to resolve host" not in res.stderr  # hostname is in /etc/hosts


@pytest.mark.slow
def test_templates_own_python3_is_unaffected_by_bundle(base: Build):
    out = sh(base, "python3 -c 'import sys, os; print(sys.prefix, os.environ.get(\"PYTHONHOME\"))'")
    assert out.strip() == "/usr None"


@pytest.mark.slow
def test_network_files_and_clean_apt(base: Build):
    r = base.rootfs
    assert (r / "etc/resolv.conf").read_text().startswith("nameserver 8.8.8.8")
    assert not (r / "etc/resolv.conf").is_symlink()
    assert "localhost" in (r / "etc/hosts").read_text() and "sandbox" in (r / "etc/hosts").read_text()
    assert (r / "etc/hostname").read_text() == "sandbox\n"
    assert [p.name for p in (r / "var/lib/apt/lists").iterdir()] == ["partial"]
    assert not list((r / "var/cache/apt/archives").glob("*.deb"))


@pytest.mark.slow
def test_bundle_inside_base_runs(base: Build):
    res = run_in_rootfs(base.rootfs, python_argv("-c", "import sys, ssl; print(sys.prefix)"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == BUNDLE_PATH_IN_SANDBOX


@pytest.mark.slow
def test_cached_base_is_verified_and_not_rebuilt(store: TemplateStore, base: Build, log,
                                                 content_check_level: str):
    assert store.verify(base.build_id)
    t0 = time.monotonic()
    again = build_base(store, log, envd_check=content_check_level)
    assert again == base
    assert time.monotonic() - t0 < 20  # verify + bundle hash, no debootstrap


@pytest.mark.slow
def test_base_production_build_envd_health(store: TemplateStore, log):
    """The production base build (gate: envd answers /health). Fails until sandboxd.envd exists."""
    b = build_base(store, log)
    res = envd_health(b.rootfs)
    assert res.returncode == 0, res.stdout + res.stderr


def test_apt_mirror_parses_deb822_and_one_line(tmp_path: Path):
    d = tmp_path / "apt"
    (d / "sources.list.d").mkdir(parents=True)
    (d / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n")
    assert apt_mirror(d) == "http://mirror.example/debian"
    d2 = tmp_path / "apt2"
    (d2 / "sources.list.d").mkdir(parents=True)
    (d2 / "sources.list").write_text("# c\ndeb [arch=amd64] http://one.example/debian bookworm main\n")
    assert apt_mirror(d2) == "http://one.example/debian"
    assert apt_mirror(tmp_path / "none") == "http://deb.debian.org/debian"


def test_debootstrap_progress_is_monotonic():
    lines = ["I: Retrieving InRelease ", "I: Retrieving Packages "]
    pkgs = [f"pkg{i}" for i in range(100)]
    lines += [f"I: {k} {p} 1.0" for p in pkgs for k in ("Retrieving", "Validating")]
    lines += [f"I: Extracting {p}..." for p in pkgs[:70]]
    lines += [f"I: Unpacking {p}..." for p in pkgs] + [f"I: Configuring {p}..." for p in pkgs]
    lines += ["I: Base system installed successfully."]
    p = DebootstrapProgress()
    msgs = [m for line in lines if (m := p.feed(line))]
    pcts = [int(m.split("[")[1].split("%")[0]) for m in msgs if "%]" in m]
    assert pcts == sorted(pcts) and pcts[-1] >= 90
    assert msgs[-1].endswith("successfully.")
    assert 10 < len(msgs) < 60  # condensed, not one line per package
