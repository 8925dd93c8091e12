"""Server settings: embedded defaults, overridable by ``SANDBOXD_*`` environment variables.

One frozen object is built at start-up and handed to every component, so nothing reads the
environment behind anyone's back and tests can run a second server with other paths and names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path("/var/lib/sandboxd")


@dataclass(frozen=True)
class Settings:
    """Everything a sandboxd server needs to know about its node."""

    data_dir: Path = DEFAULT_DATA_DIR
    host: str = "127.0.0.1"
    port: int = 3000
    #: Names of this server's network namespaces/veths start with this; two servers on one host
    #: (a developer's and the test suite's) must use different prefixes and subnets.
    net_prefix: str = "sbx"
    net_cidr: str = "10.213.0.0/16"
    max_sandboxes: int = 256
    runtime: str = "gvisor"
    #: runsc's ``--platform``; ``auto`` probes systrap, then ptrace, once at start (see runtimes/gvisor.py).
    gvisor_platform: str = "auto"
    default_template: str = "base"
    default_timeout_s: int = 300
    max_timeout_s: int = 24 * 3600
    #: How long envd may take to answer /health after the runtime started (ptrace is slow to boot Python).
    envd_ready_timeout_s: float = 30.0
    #: Sandboxes kept booted per template build in demand (the default template's from the start),
    #: claimed by creates that take its defaults; 0 turns the warm pool off (see orchestrator/pool.py).
    warm_pool_size: int = 2
    #: A template asked for in bursts gets up to this many (as many as creates asked for it in
    #: the last 30 s): the next burst finds them booted. Each costs memory and idle CPU.
    warm_pool_max: int = 8
    #: Pool boots that may run at once: a claim starts a refill at once, and creates in a row
    #: faster than one boot get more than one booting ahead (each boot is CPU the host shares).
    warm_pool_parallel: int = 2
    #: 1: microVM creates restore their template's booted image (made on first use) instead of
    #: booting; 0: every microVM create boots (see orchestrator/boot_images.py).
    microvm_boot_images: int = 1
    #: A failed start is cleaned up and retried this many times before the client gets the error.
    start_attempts: int = 2
    #: Domain mode (``serve --domain``): HTTPS on one port, ``api.<domain>`` is the API and
    #: ``<port>-<id>.<domain>`` a sandbox's port; the create/connect responses name this domain.
    domain: str | None = None
    #: The operator's certificate and key for ``<domain>`` and ``*.<domain>``; without them
    #: sandboxd makes its own CA in ``<data dir>/tls`` (see sandboxd.tls).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: A sandbox's resources unless its template's build asked for others (cpuCount, memoryMB),
    #: within the maxima. The disk is every sandbox's own ext4 image of this size (sparse).
    cpu_count: int = 2
    memory_mb: int = 512
    disk_size_mb: int = 2048
    max_cpu_count: int = 8
    max_memory_mb: int = 8192
    max_disk_size_mb: int = 65536
    #: Processes (tasks) one user may run in a sandbox: a fork bomb gets EAGAIN at this count.
    max_processes: int = 1024
    #: What one template build's RUN step may use (each step runs in a gVisor sandbox of its own,
    #: see templates/contained.py): memory, CPUs, processes (a fork bomb ends the step), how much it
    #: may write (its writable layer is an ext4 image of this size) and how long it may run.
    build_memory_mb: int = 2048
    build_cpu_count: int = 2
    build_max_processes: int = 512
    build_disk_mb: int = 10240
    build_step_timeout_s: float = 3600.0
    #: The key secrets are sealed with (32 bytes; made on first use). Default ``<data dir>/secrets.key``:
    #: point it outside the data dir so a copy of the database and the key never travel together.
    secrets_key_file: Path | None = None
    #: CA certificates (PEM) the egress proxy trusts, besides the system's, for the upstreams of
    #: hosts whose requests ``network.rules`` transform (re-read when the file changes).
    egress_upstream_ca: Path | None = None
    #: How often every running sandbox's CPU, memory and disk use is sampled (E2B: every 5 s).
    metrics_interval_s: float = 5.0
    database_url: str | None = field(default=None)
    #: Built-in templates ``serve`` builds in the background after ``base`` (comma-separated;
    #: empty: none). A create naming one before it is ready gets a 503 saying how far it got.
    builtin_templates: str = "code-interpreter-v1"
    #: Cluster membership (cluster/membership.py). This node's id (default: made once, kept in
    #: ``<data dir>/node_id``); what its sandboxes may be given in total (0: the host's CPUs × 8,
    #: its memory); how often it heartbeats; how long a silent node stays a member before it and
    #: its sandboxes are reported gone.
    node_id: str | None = None
    node_vcpus: int = 0
    node_memory_mb: int = 0
    heartbeat_interval_s: float = 2.0
    node_timeout_s: float = 15.0
    #: Cluster mode (``sandboxd api`` / ``sandboxd node``): the file holding the secret every API↔node
    #: request carries (the same file on every machine; at least 32 bytes); the URL the API reaches
    #: this node at (default ``http://<host>:<port>``); how many nodes placement compares per create.
    cluster_secret_file: Path | None = None
    #: optional mutual TLS between API replicas and nodes (cluster/tls.py): this machine's ca.pem,
    #: cert.pem and key.pem (``sandboxd cluster certs``); the secret is still required
    cluster_tls_dir: Path | None = None
    node_address: str | None = None
    placement_choices: int = 2

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'db.sqlite'}"

    @property
    def templates_dir(self) -> Path:
        return self.data_dir / "templates"

    @property
    def sandboxes_dir(self) -> Path:
        return self.data_dir / "sandboxes"

    @property
    def runsc_root(self) -> Path:
        return self.data_dir / "runsc"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``SANDBOXD_<FIELD>`` variables, then explicit overrides (CLI flags)."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f"SANDBOXD_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _convert(f.type, raw)
        settings = cls(**values)
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _convert(type_name: Any, raw: str) -> Any:
    """Turn an environment string into the field's type (annotations are strings here)."""
    t = str(type_name)
    if t.startswith("int"):
        return int(raw)
    if t.startswith("float"):
        return float(raw)
    if t.startswith("Path"):
        return Path(raw) if raw or "None" not in t else None
    return raw or None if "None" in t else raw
