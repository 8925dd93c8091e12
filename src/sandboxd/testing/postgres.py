"""A throwaway, real PostgreSQL server for tests and benchmarks (Debian's ``postgresql`` package).

``initdb`` into a temporary directory as the ``postgres`` user (PostgreSQL refuses to run as root),
listening on a free loopback port and a unix socket inside that directory, trust authentication
(only this host's processes reach it), stopped and removed at the end. Nothing touches the
system's own clusters under /var/lib/postgresql. ``restart()`` and ``kill()`` let a failure test
take it away from a running sandboxd and bring it back on the same port and data.
"""

from __future__ import annotations

import contextlib
import glob
import ipaddress
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sandboxd.testing.server import free_port

USER = "postgres"


def pg_bin_dir() -> Path | None:
    """Debian keeps the server binaries out of PATH, in /usr/lib/postgresql/<major>/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def available() -> str | None:
    """Why PostgreSQL cannot be started here (None: it can)."""
    if pg_bin_dir() is None:
        return "Debian's postgresql package is not installed (./sandboxd.sh test installs it)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"no {USER!r} user (the postgresql package makes it)"
    return None


@dataclass
class Postgres:
    """One running PostgreSQL: ``url(dbname)`` is a SQLAlchemy URL (psycopg 3 driver)."""

    base: Path
    port: int
    bin_dir: Path
    #: addresses it listens on (loopback, and a test network's host side for nodes in namespaces)
    listen: tuple[str, ...] = ("127.0.0.1",)

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base / "run"

    def url(self, dbname: str = "postgres", host: str = "127.0.0.1") -> str:
        return f"postgresql+psycopg://{USER}@{host}:{self.port}/{dbname}"

    def as_postgres(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", USER, "--", *argv], capture_output=True, text=True, check=check,
                              cwd="/")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.socket_dir} -c listen_addresses={','.join(self.listen)} -c fsync=off " \
               "-c max_connections=300"
        res = self.as_postgres(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "log"),
                                "-o", opts, "-w", "-t", "60", "start", check=False)
        if res.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {res.stderr}\n{self.log()[-3000:]}")

    def stop(self, mode: str = "fast") -> None:
        self.as_postgres(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        """Stop (open connections are cut) and start again, same port, same data."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash): its children exit when they see it gone."""
        pid_file = self.data / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its SQLAlchemy URL."""
        name = name or "t_" + secrets.token_hex(6)
        self.as_postgres(str(self.bin_dir / "createdb"), "-h", str(self.socket_dir), "-p", str(self.port), name)
        return self.url(name)

    def log(self) -> str:
        try:
            return (self.base / "log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


@contextlib.contextmanager
def running_postgres(parent: Path | None = None, networks: tuple[str, ...] = ()) -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster, started; stopped and its files removed on exit. ``networks``
    (``10.251.7.0/24``): test networks whose host-side address it also listens on, trusting
    clients from them (nodes in network namespaces)."""
    why = available()
    if why is not None:
        raise RuntimeError(why)
    bin_dir = pg_bin_dir()
    assert bin_dir is not None
    base = Path(tempfile.mkdtemp(prefix="sandboxd-pg-", dir=parent))
    base.chmod(0o755)
    listen = ("127.0.0.1", *(str(next(ipaddress.ip_network(n).hosts())) for n in networks))
    pg = Postgres(base, free_port(), bin_dir, listen)
    entry = pwd.getpwnam(USER)
    for d in (pg.data, pg.socket_dir):
        d.mkdir()
        os.chown(d, entry.pw_uid, entry.pw_gid)
    (base / "log").touch()
    os.chown(base / "log", entry.pw_uid, entry.pw_gid)
    try:
        pg.as_postgres(str(bin_dir / "initdb"), "-D", str(pg.data), "-U", USER, "--auth=trust",
                        "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
        with open(pg.data / "pg_hba.conf", "a") as hba:
            hba.writelines(f"host all all {n} trust\n" for n in networks)
        pg.start()
        yield pg
    finally:
        pg.stop("immediate")
        deadline = time.monotonic() + 10
        while (pg.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(base, ignore_errors=True)
