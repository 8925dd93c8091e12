"""A real cluster on this machine, for tests and benchmarks: PostgreSQL, API replicas and nodes.

Each node runs in a network namespace of its own with its own address on a private test network
(``10.251.X.0/24``, a bridge on the host side; no default route, so nothing leaves the host);
PostgreSQL listens on the bridge's address and on loopback; the API replicas listen on loopback,
where the SDK reaches them, and reach the nodes over the bridge. Every process is a real
``sandboxd api`` / ``sandboxd node`` subprocess; everything is stopped and removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sandboxd.cluster.tls import ClusterTls, make_machine_certs
from sandboxd.config import Settings
from sandboxd.store.db import Database
from sandboxd.templates.store import BuildError, remove_tree
from sandboxd.testing.postgres import Postgres, running_postgres
from sandboxd.testing.server import _env, free_port, run_dir, stop, unique_network

NODE_PORT = 3000


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@dataclass
class TestNetwork:
    """A bridge on the host and one namespace per node on it."""

    tag: str
    subnet_octet: int
    namespaces: list[str] = field(default_factory=list)

    @property
    def cidr(self) -> str:
        return f"10.251.{self.subnet_octet}.0/24"

    @property
    def host_address(self) -> str:
        return f"10.251.{self.subnet_octet}.1"

    @property
    def bridge(self) -> str:
        return f"sc{self.tag}br"

    def add_namespace(self, index: int) -> tuple[str, str]:
        """A namespace with address .(10+index) on the bridge; its name and address."""
        ns, veth, address = f"sc{self.tag}n{index}", f"sc{self.tag}v{index}", f"10.251.{self.subnet_octet}.{10 + index}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns, address

    def remove(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)


@contextlib.contextmanager
def test_network() -> Iterator[TestNetwork]:
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    free = [n for n in range(1, 250) if f"10.251.{n}." not in used]
    net = TestNetwork("".join(random.choices("abcdefghijklmnopqrstuvwxyz", k=4)), random.choice(free))
    try:
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{net.host_address}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        yield net
    finally:
        net.remove()


@dataclass
class Proc:
    """One ``sandboxd api`` or ``sandboxd node`` process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    settings: Settings
    log_path: Path
    url: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def kill9(self) -> None:
        """SIGKILL the whole process group: a crash, nothing cleaned up."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Cluster:
    pg: Postgres
    db_url: str
    api_key: str
    apis: list[Proc]
    nodes: list[Proc]
    network: TestNetwork
    secret_file: Path
    #: the test's own mTLS files (a client certificate of the cluster's CA), when the cluster has mTLS
    tls: ClusterTls | None = None

    def db(self) -> Database:
        return Database(self.db_url)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log()[-4000:]}" for p in [*self.apis, *self.nodes])


def _wait(proc: Proc, url: str, timeout: float, headers: dict[str, str] | None = None,
          verify: ssl.SSLContext | bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc is not None and proc.proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.log()[-5000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1, headers=headers, verify=verify).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} did not answer within {timeout}s:\n{proc.log()[-5000:]}")


def wait_node(cluster: Cluster, node: Proc, timeout: float = 600) -> None:
    secret = cluster.secret_file.read_text().strip()
    _wait(node, node.url + "/internal/v1/health", timeout, {"x-sandboxd-cluster-secret": secret},
          ClusterTls.verify(cluster.tls))


def wait_api(api: Proc, timeout: float = 60) -> None:
    _wait(api, api.url + "/health", timeout)


def kill_all(cluster: Cluster) -> None:
    """Kill every recorded sandbox through its node, and wait for the teardowns."""
    from sandboxd.cluster.node_client import NodeClients
    from sandboxd.store.nodes_db import Nodes

    db = cluster.db()
    clients = NodeClients(cluster.secret_file.read_text().strip(), cluster.tls)
    nodes = {n.node_id: n for n in Nodes(db).all()}
    try:
        for row in db.list_sandboxes():
            node = nodes.get(row.node_id or "")
            if node is not None:
                with contextlib.suppress(Exception):
                    clients.get(node.node_id, node.address).kill(row.sandbox_id)
    finally:
        clients.close()


@contextlib.contextmanager
def running_cluster(shared_data_dir: Path, log_dir: Path, apis: int = 2, nodes: int = 3,
                    own_templates: tuple[int, ...] = (), tls: bool = False, **overrides: Any) -> Iterator[Cluster]:
    """PostgreSQL, ``nodes`` nodes (each in its namespace) and ``apis`` API replicas, started;
    ``overrides`` are settings for every process (``node_timeout_s``...). Nodes share the test
    template store, but those numbered in ``own_templates`` (1-based) start with an empty one of
    their own, after the others: they fetch ``base`` from them. All stopped and removed on exit,
    and the sandboxes of nodes still running killed first (a node killed by the test is started
    once more to reconcile, then stopped). ``tls``: mutual TLS between the API replicas and the
    nodes (a CA and a certificate per process, ``cluster/tls.py``)."""
    exe = str(Path(sys.executable).with_name("sandboxd"))
    with test_network() as net, running_postgres(networks=(net.cidr,)) as pg:
        url = pg.create_database("sandboxd")
        secret_file = log_dir / "cluster.secret"
        secret_file.write_text(secrets.token_urlsafe(32) + "\n")
        secret_file.chmod(0o600)
        common = {"database_url": url, "cluster_secret_file": secret_file, "warm_pool_size": 0,
                  "builtin_templates": "", "heartbeat_interval_s": 1.0, **overrides}
        api_key = Database(url).create_api_key("tests")
        certs = log_dir / "tls"

        def tls_dir(machine: str, address: str) -> dict[str, Path]:
            return {"cluster_tls_dir": make_machine_certs(certs, machine, [address])} if tls else {}

        dirs: list[Path] = []
        node_procs: list[Proc] = []
        for i in range(1, nodes + 1):
            ns, address = net.add_namespace(i)
            prefix, cidr = unique_network()
            data_dir = run_dir(shared_data_dir)
            dirs.append(data_dir)
            if i in own_templates:
                (data_dir / "templates").unlink()
                (data_dir / "templates").mkdir()
            node_url = pg.url("sandboxd", net.host_address)
            settings = Settings.from_env({}, **{**common, "database_url": node_url, "data_dir": data_dir,
                                                "host": address, "port": NODE_PORT, "net_prefix": prefix,
                                                "net_cidr": cidr, "node_id": f"node{i}",
                                                **tls_dir(f"node{i}", address)})
            node_procs.append(Proc(f"node{i}", ["nsenter", f"--net=/run/netns/{ns}", exe, "node"], _env(settings),
                                   settings, log_dir / f"node{i}.log",
                                   f"{'https' if tls else 'http'}://{address}:{NODE_PORT}"))
        api_procs: list[Proc] = []
        for i in range(1, apis + 1):
            data_dir = run_dir(shared_data_dir)
            dirs.append(data_dir)
            settings = Settings.from_env({}, **{**common, "data_dir": data_dir, "port": free_port(),
                                                "secrets_key_file": log_dir / "secrets.key",
                                                **tls_dir(f"api{i}", "127.0.0.1")})
            api_procs.append(Proc(f"api{i}", [exe, "api"], _env(settings), settings, log_dir / f"api{i}.log",
                                  f"http://127.0.0.1:{settings.port}"))
        tester = ClusterTls(*(make_machine_certs(certs, "tester", ["127.0.0.1"]) / f
                              for f in ("ca.pem", "cert.pem", "key.pem"))) if tls else None
        cluster = Cluster(pg, url, api_key, api_procs, node_procs, net, secret_file, tester)
        try:
            first = [p for i, p in enumerate(node_procs, 1) if i not in own_templates]
            for p in first:
                p.start()
            for p in first:
                wait_node(cluster, p)
            if own_templates:
                time.sleep(2.5)  # a heartbeat: the first nodes' builds and checksums are recorded
            for p in node_procs:
                if p not in first:
                    p.start()
                    wait_node(cluster, p)
            for p in api_procs:
                p.start()
            for p in api_procs:
                wait_api(p)
            yield cluster
        finally:
            for p in api_procs:
                p.stop()
            for p in node_procs:
                if not p.running:  # killed by the test: its recovery removes what it left
                    p.start()
                    with contextlib.suppress(RuntimeError):
                        wait_node(cluster, p, timeout=120)
            kill_all(cluster)  # a stopped node keeps its sandboxes (for its next start): end them first
            for p in node_procs:
                p.stop()
                subprocess.run(["nsenter", f"--net=/run/netns/{net.namespaces[node_procs.index(p)]}",
                                "nft", "delete", "table", "ip", f"sandboxd_{p.settings.net_prefix}"],
                               capture_output=True)
            for d in dirs:
                try:
                    remove_tree(d)
                except (BuildError, OSError) as exc:
                    print(f"left {d} in place: {exc}")
