"""The built-in templates: ``base`` (E2B's default: Debian bookworm, user ``user``, bash, python3
with pip and venv, node and npm, git, curl, passwordless sudo) and ``tiny`` (busybox only, no
libc, no Python: proves envd needs nothing from the template).

Why the recipe is this file: the recipe text that goes into the build id is this module's source,
so *any* change to how a template is made yields a new build id and can never be served from an
old build (seed 000, cause 2). The envd bundle's content hash is an input too.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from sandboxd.envd.contract import BUNDLE_PATH_IN_SANDBOX, DEFAULT_PATH, DEFAULT_USER, DEFAULT_WORKDIR
from sandboxd.templates.check import check_envd_starts
from sandboxd.templates.envd_bundle import build_envd_bundle, bundle_hash
from sandboxd.templates.store import Build, BuildInputs, LogFn, TemplateStore

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: What E2B users expect in the default template: the SDK's template helpers (``pip_install``,
#: ``npm_install``, ``git_clone``, ``apt_install``) and ``sandbox.git`` run these commands.
BASE_PACKAGES: tuple[str, ...] = ("bash", "python3", "sudo", "ca-certificates", "procps", "iproute2",
                                  "python3-pip", "python3-venv", "nodejs", "git", "curl")
#: npm from the npm registry (``npm pack``), not Debian's npm: that one is 350 packages and tripled
#: the base build; this is one self-contained tarball. 10.x runs on bookworm's node 18.
NPM_VERSION = "10.9.8"
USER, UID, GID, HOME = DEFAULT_USER, 1000, 1000, DEFAULT_WORKDIR  # E2B's user, whose home is the default workdir
HOSTNAME = "sandbox"
BUSYBOX = Path("/bin/busybox")  # Debian busybox-static: statically linked, needs no libc
_CHROOT_ENV = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}

RESOLV_CONF = "nameserver 8.8.8.8\nnameserver 1.1.1.1\n"
HOSTS = (f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n"
         "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n")


def _recipe_text() -> str:
    return Path(__file__).read_text()


# ---------------------------------------------------------------------------------------------
# Mirror.


def apt_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The machine's Debian mirror for ``SUITE`` (deb822 ``.sources`` or one-line ``.list``), so
    builds use whatever mirror/proxy the host is configured for."""
    files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.sources")),
             *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and SUITE in fields.get("Suites", "").split():
                    for uri in fields.get("URIs", "").split():
                        if "security" not in uri:
                            return uri.rstrip("/")
        else:
            for line in text.splitlines():
                m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m and m.group(2) == SUITE and "security" not in m.group(1):
                    return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


# ---------------------------------------------------------------------------------------------
# debootstrap with progress.


class DebootstrapProgress:
    """Turns debootstrap's ``I: Retrieving/Validating/Extracting/Unpacking/Configuring`` lines into
    progress messages. The package count N is only known once retrieval ends, so retrieval reports
    a count; afterwards the total is estimated as ~4.7 N lines (retrieve + validate N each,
    extract the required subset, unpack and configure N each)."""

    _STEP = re.compile(r"^I: (Retrieving|Validating|Extracting|Unpacking|Configuring) (\S+)( \S+)?")
    _EVERY = 20  # log at most every 20 steps within a phase (plus every phase change)

    def __init__(self) -> None:
        self.steps = 0
        self.packages = 0
        self.phase = ""
        self.logged_at = 0

    def percent(self) -> int | None:
        if self.phase in ("", "downloading"):
            return None
        return min(99, 100 * self.steps // max(int(self.packages * 4.7), self.steps + 1))

    def feed(self, line: str) -> str | None:
        """A progress message worth logging for ``line``, or None."""
        m = self._STEP.match(line)
        if not m:
            if line.startswith(("W:", "E:")) or "successfully" in line:
                return f"debootstrap: {line}"
            return None
        kind, pkg, version = m.groups()
        phase = "downloading" if kind in ("Retrieving", "Validating") else kind.lower()
        pkg = pkg.rstrip(".")
        self.steps += 1
        if kind == "Retrieving" and version:  # "I: Retrieving bash 5.2..." (not InRelease/Packages)
            self.packages += 1
        if phase == self.phase and self.steps - self.logged_at < self._EVERY:
            return None
        self.phase, self.logged_at = phase, self.steps
        pct = self.percent()
        where = f"{pct:3d}%" if pct is not None else f"{self.packages} pkgs"
        return f"debootstrap [{where}] step {self.steps}: {phase} {pkg}"


def debootstrap(rootfs: Path, packages: tuple[str, ...], mirror: str, log: LogFn) -> None:
    """``debootstrap --variant=minbase`` into the empty ``rootfs``, reporting progress."""
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(rootfs), mirror]
    log("running " + " ".join(cmd))
    progress = DebootstrapProgress()
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**_CHROOT_ENV, "DEBIAN_FRONTEND": "noninteractive"})
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = ([*tail, line])[-30:]
        if msg := progress.feed(line):
            log(msg)
    if proc.wait() != 0:
        dlog = rootfs / "debootstrap" / "debootstrap.log"
        extra = dlog.read_text(errors="replace").splitlines()[-30:] if dlog.exists() else []
        raise RuntimeError(f"debootstrap failed (rc={proc.returncode}):\n" + "\n".join(tail + extra))


# ---------------------------------------------------------------------------------------------
# Configuration steps (each small, each writing only inside rootfs).


def _chroot(rootfs: Path, *argv: str) -> None:
    subprocess.run(["chroot", str(rootfs), *argv], check=True, env=_CHROOT_ENV, capture_output=True)


def _write(rootfs: Path, rel: str, text: str, mode: int = 0o644) -> None:
    p = rootfs / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.is_symlink() or p.exists():
        p.unlink()
    p.write_text(text)
    os.chmod(p, mode)


def configure_network_files(rootfs: Path) -> None:
    """The rootfs's own resolv.conf/hosts/hostname (the host's copies made servers start ~10 s late)."""
    _write(rootfs, "etc/resolv.conf", RESOLV_CONF)
    _write(rootfs, "etc/hosts", HOSTS)
    _write(rootfs, "etc/hostname", HOSTNAME + "\n")


def add_user(rootfs: Path) -> None:
    """E2B's ``user`` (uid/gid 1000, bash, home) with passwordless sudo."""
    _chroot(rootfs, "groupadd", "-g", str(GID), USER)
    _chroot(rootfs, "useradd", "-m", "-d", HOME, "-u", str(UID), "-g", str(GID), "-s", "/bin/bash", USER)
    _write(rootfs, f"etc/sudoers.d/{USER}", f"{USER} ALL=(ALL:ALL) NOPASSWD: ALL\n", 0o440)


def quicken_login_shell(rootfs: Path) -> None:
    """Every ``commands.run`` is ``bash -l -c``: Debian's /etc/profile forks ``id -u`` for each
    one (a whole fork+exec under gVisor, ~40% of the shell's start). Bash knows its ``EUID``; sh
    (which lacks it) still asks ``id``, so the PATH a login shell gets is unchanged."""
    profile = rootfs / "etc/profile"
    text = profile.read_text()
    if '"$(id -u)"' not in text:
        raise RuntimeError("/etc/profile no longer tests \"$(id -u)\": review quicken_login_shell")
    profile.write_text(text.replace('"$(id -u)"', '"${EUID:-$(id -u)}"'))


def clean_apt(rootfs: Path) -> None:
    """Drop downloaded .debs and package lists: not needed at run time, ~100 MB."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                    "var/cache/debconf/*-old", "var/log/bootstrap.log"):
        for p in rootfs.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)


def allow_pip_install(rootfs: Path) -> None:
    """``pip install`` as root installs into the system Python, as on E2B's images (Debian's
    PEP 668 marker would refuse it, and the SDK's ``pip_install`` runs exactly that)."""
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()


def install_npm(rootfs: Path, log: LogFn) -> None:
    """npm ``NPM_VERSION`` where Debian's node looks for global packages (its prefix is /usr, so
    ``npm install -g`` puts packages beside it), fetched by the host's npm client."""
    dest = rootfs / "usr/lib/node_modules/npm"
    with tempfile.TemporaryDirectory(prefix="sandboxd-npm-") as tmp:
        subprocess.run(["npm", "pack", f"npm@{NPM_VERSION}", "--pack-destination", tmp, "--silent"],
                       check=True, capture_output=True, cwd=tmp)
        tarball = next(Path(tmp).glob("npm-*.tgz"))
        dest.mkdir(parents=True)
        subprocess.run(["tar", "-xzf", str(tarball), "-C", str(dest), "--strip-components=1",
                        "--no-same-owner"], check=True, capture_output=True)
    for tool in ("npm", "npx"):
        (rootfs / "usr/bin" / tool).symlink_to(f"../lib/node_modules/npm/bin/{tool}-cli.js")
    log(f"npm {NPM_VERSION} installed in /usr/lib/node_modules")


def install_bundle(rootfs: Path, expected_hash: str, log: LogFn) -> None:
    """Copy the envd bundle to /opt/sandboxd; fail if it is not the bundle the build id names."""
    got = build_envd_bundle(rootfs / BUNDLE_PATH_IN_SANDBOX.lstrip("/"))
    if got != expected_hash:
        raise RuntimeError(f"envd bundle changed during the build ({got[:12]} != {expected_hash[:12]})")
    log(f"envd bundle {got[:16]} installed at {BUNDLE_PATH_IN_SANDBOX}")


# ---------------------------------------------------------------------------------------------
# Templates.


def base_inputs(mirror: str | None = None, envd_hash: str | None = None,
                envd_check: str = "health") -> BuildInputs:
    return BuildInputs(name="base", recipe=_recipe_text(), packages=BASE_PACKAGES,
                       mirror=mirror or apt_mirror(), envd_bundle_hash=envd_hash or bundle_hash(),
                       extra=(("suite", SUITE), ("variant", "minbase"), ("arch", "amd64"),
                              ("envd_check", envd_check)))


def build_base(store: TemplateStore, log: LogFn, *, envd_check: str = "health",
               envd_hash: str | None = None) -> Build:
    """The ``base`` template: cached if its build id exists and verifies, else built (~40 s).

    ``envd_check`` is the build gate (see :func:`check_envd_starts`); only "health" is for
    production, and it is part of the build id. ``envd_hash`` saves recomputing the bundle's
    hash when the caller has it already (the bundle itself is checked against it)."""
    inputs = base_inputs(envd_hash=envd_hash, envd_check=envd_check)

    def builder(rootfs: Path, blog: LogFn) -> None:
        debootstrap(rootfs, inputs.packages, inputs.mirror, blog)
        blog("configuring user, sudo, network files, pip, npm")
        configure_network_files(rootfs)
        add_user(rootfs)
        allow_pip_install(rootfs)
        quicken_login_shell(rootfs)
        install_npm(rootfs, blog)
        clean_apt(rootfs)
        install_bundle(rootfs, inputs.envd_bundle_hash, blog)
        check_envd_starts(rootfs, blog, level=envd_check)

    return store.build(inputs, builder, log)


def _file_sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tiny_inputs(envd_hash: str | None = None, envd_check: str = "health") -> BuildInputs:
    if not BUSYBOX.exists():
        raise FileNotFoundError(f"{BUSYBOX} missing: apt-get install -y busybox-static")
    return BuildInputs(name="tiny", recipe=_recipe_text(), packages=("busybox-static",),
                       envd_bundle_hash=envd_hash or bundle_hash(),
                       extra=(("busybox_sha256", _file_sha256(BUSYBOX)), ("envd_check", envd_check)))


def _busybox_applets() -> list[str]:
    out = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout
    return sorted(a for a in out.split() if a and "/" not in a and a not in ("busybox", "linuxrc"))


def make_tiny_rootfs(rootfs: Path) -> None:
    """busybox-static as /bin/busybox plus applet symlinks (and a bash that is sh), passwd/group with
    root and user, network files. No libc, no Python, no envd bundle yet."""
    for d in ("bin", "dev", "etc", "proc", "sys", "root", "run", "opt", "var/tmp", HOME.lstrip("/")):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").mkdir(mode=0o1777)
    os.chmod(rootfs / "tmp", 0o1777)
    os.chmod(rootfs / "root", 0o700)
    shutil.copyfile(BUSYBOX, rootfs / "bin/busybox")
    os.chmod(rootfs / "bin/busybox", 0o755)
    for applet in _busybox_applets():
        (rootfs / "bin" / applet).symlink_to("busybox")
    # the SDK runs every command as `/bin/bash -l -c ...`; busybox has no bash applet, so bash is sh
    _write(rootfs, "bin/bash", '#!/bin/sh\nexec /bin/sh "$@"\n', 0o755)
    (rootfs / "sbin").symlink_to("bin")
    (rootfs / "usr").mkdir()
    for d in ("bin", "sbin"):
        (rootfs / "usr" / d).symlink_to("../bin")
    _write(rootfs, "etc/passwd", f"root:x:0:0:root:/root:/bin/sh\n{USER}:x:{UID}:{GID}::{HOME}:/bin/sh\n")
    _write(rootfs, "etc/group", f"root:x:0:\n{USER}:x:{GID}:\n")
    os.chown(rootfs / HOME.lstrip("/"), UID, GID)
    configure_network_files(rootfs)


def build_tiny(store: TemplateStore, log: LogFn, *, envd_check: str = "health") -> Build:
    """The ``tiny`` template: static busybox (sh, and bash→busybox), no libc, no Python."""
    inputs = tiny_inputs(envd_check=envd_check)

    def builder(rootfs: Path, blog: LogFn) -> None:
        make_tiny_rootfs(rootfs)
        install_bundle(rootfs, inputs.envd_bundle_hash, blog)
        check_envd_starts(rootfs, blog, level=envd_check)

    return store.build(inputs, builder, log)
