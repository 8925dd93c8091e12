"""``sandboxd`` command line: serve, build the base template, manage API keys."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from sandboxd.config import Settings
from sandboxd.interpreter.template import start_builtin_builds
from sandboxd.store.db import Database
from sandboxd.templates.base import build_base
from sandboxd.templates.store import TemplateStore

#: Above the SDK's 300 s idle-connection expiry, so the server never closes a pooled connection
#: the client is about to reuse (protocol note 1.4).
KEEP_ALIVE_S = 330


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


def ensure_base_template(settings: Settings, db: Database) -> str:
    """Build (or find cached and verified) the ``base`` template and point the alias at it."""
    from sandboxd.templates.cli_build import base_build_display

    with base_build_display(_echo) as log:
        build = build_base(TemplateStore(settings.templates_dir), log)
    db.set_template("base", build.build_id, runtime=settings.runtime)
    return build.build_id


def ensure_api_key(db: Database) -> str | None:
    """On the very first start, create an API key and return it (it is shown once, never stored)."""
    if db.count_api_keys():
        return None
    return db.create_api_key("first key")


def _settings(data_dir: Path | None, host: str | None = None, port: int | None = None,
              **more: Any) -> Settings:
    return Settings.from_env(data_dir=data_dir, host=host, port=port, **more)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """sandboxd: self-hosted, E2B-compatible sandboxes."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per envd poll is noise


@main.command()
@click.option("--host", default=None, help="Listen address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Listen port (default 3000).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Default /var/lib/sandboxd.")
@click.option("--domain", default=None,
              help="Serve HTTPS for this domain: api.<domain> is the API, <port>-<id>.<domain> a sandbox "
                   "(point wildcard DNS at this host). Default port 443.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Certificate (chain) for <domain> and *.<domain>; default: one from a CA sandboxd makes.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The certificate's private key.")
def serve(host: str | None, port: int | None, data_dir: Path | None, domain: str | None,
          tls_cert: Path | None, tls_key: Path | None) -> None:
    """Prepare the node (base template, first API key) and serve the API + proxy."""
    import os

    import uvicorn

    from sandboxd.server import build_app
    from sandboxd.tls import tls_files, trust_instructions

    settings = _settings(data_dir, host, port, domain=domain.strip(".").lower() if domain else None,
                         tls_cert=tls_cert, tls_key=tls_key)
    if settings.domain and port is None and "SANDBOXD_PORT" not in os.environ:
        settings = replace(settings, port=443)
    if not settings.domain and (settings.tls_cert or settings.tls_key):
        raise click.UsageError("--tls-cert/--tls-key need --domain (the certificate is for that domain)")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ssl: dict[str, Any] = {}
    if settings.domain:
        try:
            files = tls_files(settings.data_dir, settings.domain, settings.tls_cert, settings.tls_key)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        ssl = {"ssl_certfile": str(files.cert), "ssl_keyfile": str(files.key)}
    db = Database(settings.db_url)
    ensure_base_template(settings, db)
    try:
        start_builtin_builds(settings, db, _echo)  # code-interpreter-v1, while the API already serves
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    key = ensure_api_key(db)
    if key:
        _echo("\n  Your API key (shown once; create more with `sandboxd keys create`):\n"
              f"\n    export E2B_API_KEY={key}\n")
    if settings.domain:
        _echo(f"  Serving https://api.{settings.domain} and https://<port>-<sandbox id>.{settings.domain} on "
              f"{settings.host}:{settings.port}: point *.{settings.domain} (and api.{settings.domain}) at this "
              f"host in DNS, then\n\n    export E2B_DOMAIN={settings.domain}\n")
        _echo(trust_instructions(files))
    else:
        url = f"http://{settings.host}:{settings.port}"
        _echo(f"  export E2B_API_URL={url} E2B_SANDBOX_URL={url}\n")
    app = build_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, timeout_keep_alive=KEEP_ALIVE_S,
                log_level="info", access_log=False, **ssl)


def _cluster_settings(data_dir: Path | None, host: str | None, port: int | None) -> Settings:
    settings = _settings(data_dir, host, port)
    if not settings.database_url or settings.database_url.startswith("sqlite"):
        raise click.UsageError("cluster mode needs SANDBOXD_DATABASE_URL pointing at the cluster's PostgreSQL "
                               "(postgresql+psycopg://user@host/db)")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings


@main.command()
@click.option("--host", default=None, help="Listen address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Listen port (default 3000).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def api(host: str | None, port: int | None, data_dir: Path | None) -> None:
    """Cluster mode: E2B's API and the sandbox proxy over every node (stateless; run several)."""
    import uvicorn

    from sandboxd.cluster.apps import build_api_app
    from sandboxd.cluster.auth import ClusterConfigError
    from sandboxd.cluster.tls import ClusterTlsError

    settings = _cluster_settings(data_dir, host, port)
    key = ensure_api_key(Database(settings.db_url))
    if key:
        _echo(f"\n  Your API key (shown once):\n\n    export E2B_API_KEY={key}\n")
    try:
        app = build_api_app(settings)
    except (ClusterConfigError, ClusterTlsError) as exc:
        raise click.UsageError(str(exc)) from exc
    uvicorn.run(app, host=settings.host, port=settings.port, timeout_keep_alive=KEEP_ALIVE_S,
                log_level="info", access_log=False)


@main.group(invoke_without_command=True)
@click.option("--host", default=None, help="Listen address (the API replicas reach it there).")
@click.option("--port", type=int, default=None, help="Listen port (default 3000).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.pass_context
def node(ctx: click.Context, host: str | None, port: int | None, data_dir: Path | None) -> None:
    """Cluster mode: this machine's orchestrator, runtimes and template cache (one per machine)."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from sandboxd.cluster.apps import build_node_app
    from sandboxd.cluster.auth import ClusterConfigError, load_secret
    from sandboxd.cluster.builds import fetch_base
    from sandboxd.cluster.membership import node_id_of
    from sandboxd.cluster.tls import ClusterTlsError, cluster_tls
    from sandboxd.store.nodes_db import Nodes

    settings = _cluster_settings(data_dir, host, port)
    db = Database(settings.db_url)
    try:
        secret = load_secret(settings)
        tls = cluster_tls(settings)
        fetch_base(TemplateStore(settings.templates_dir), Nodes(db), node_id_of(settings), secret, tls)
        ensure_base_template(settings, db)  # verifies the fetched build, or builds it: the first node
        app = build_node_app(settings)
    except (ClusterConfigError, ClusterTlsError) as exc:
        raise click.UsageError(str(exc)) from exc
    uvicorn.run(app, host=settings.host, port=settings.port, timeout_keep_alive=KEEP_ALIVE_S,
                log_level="info", access_log=False, **(tls.server_options() if tls is not None else {}))


@node.command("list")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def node_list(data_dir: Path | None) -> None:
    """Every node of the cluster: state, address, free vCPUs/memory, sandboxes, last heartbeat."""
    from sandboxd.store.nodes_db import Nodes

    click.echo(f"{'NODE':<22}{'STATE':<10}{'ADDRESS':<28}{'FREE VCPUS':<12}{'FREE MB':<14}{'SANDBOXES':<11}HEARTBEAT")
    for n in Nodes(Database(_settings(data_dir).db_url)).all():
        click.echo(f"{n.node_id[:21]:<22}{n.state:<10}{(n.address or '-')[:27]:<28}{f'{n.free_vcpus}/{n.vcpus}':<12}"
                   f"{f'{n.free_memory_mb}/{n.memory_mb}':<14}{n.sandboxes:<11}{n.heartbeat_at:%Y-%m-%d %H:%M:%S}")


@node.command("drain")
@click.argument("node_id")
@click.option("--undo", is_flag=True, help="Take new sandboxes again.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def node_drain(node_id: str, undo: bool, data_dir: Path | None) -> None:
    """Place no new sandboxes on NODE_ID (its running ones run on until they end; it stays
    draining across restarts until `--undo`)."""
    from sandboxd.store.nodes_db import ACTIVE, DRAINING, Nodes

    nodes = Nodes(Database(_settings(data_dir).db_url))
    if not nodes.set_state(node_id, ACTIVE if undo else DRAINING):
        raise click.ClickException(f"no node {node_id!r} (sandboxd node list)")
    row = nodes.get(node_id)
    click.echo(f"{node_id}: {ACTIVE if undo else DRAINING} ({row.sandboxes if row else 0} sandboxes on it)")


@main.group("cluster")
def cluster_group() -> None:
    """Cluster mode helpers."""


@cluster_group.command("certs")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.argument("machine")
@click.option("--name", "names", multiple=True, required=True,
              help="An address or host name MACHINE is reached at (repeat; a node: the one in its address).")
def cluster_certs(out_dir: Path, machine: str, names: tuple[str, ...]) -> None:
    """Optional mTLS between API replicas and nodes: the cluster CA in OUT_DIR (made once, then
    kept) and OUT_DIR/MACHINE with ca.pem, cert.pem, key.pem for MACHINE. Copy that directory to
    the machine and set SANDBOXD_CLUSTER_TLS_DIR to it, on every API replica and node."""
    from sandboxd.cluster.tls import ClusterTlsError, make_machine_certs

    try:
        d = make_machine_certs(out_dir, machine, list(names))
    except ClusterTlsError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"{d}: ca.pem, cert.pem, key.pem for {machine} ({', '.join(names)}); "
               f"on that machine: SANDBOXD_CLUSTER_TLS_DIR={d}")


@main.group()
def template() -> None:
    """Template builds."""


@template.command("build-base")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def build_base_cmd(data_dir: Path | None) -> None:
    """Build the `base` template (Debian bookworm, user `user`) or verify the cached build."""
    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    build_id = ensure_base_template(settings, Database(settings.db_url))
    click.echo(build_id)


@template.command("build")
@click.option("-f", "--file", "dockerfile", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Dockerfile (default: CONTEXT/Dockerfile).")
@click.option("-n", "--name", required=True, help="Template name, optionally name:tag.")
@click.option("--no-cache", is_flag=True, help="Run every step again (new layers, new build id).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.argument("context", type=click.Path(exists=True, file_okay=False, path_type=Path), default=".")
def build_cmd(dockerfile: Path | None, name: str, no_cache: bool, data_dir: Path | None, context: Path) -> None:
    """Build a template from a Dockerfile, as `Template.build` would over the API.

    Progress goes to stderr; the build id is printed on stdout. Unchanged steps come from the
    layer cache; the template name (and tag) points at the new build once it passed its checks."""
    from sandboxd.templates.cli_build import build_from_dockerfile

    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    build_id = build_from_dockerfile(settings, dockerfile or context / "Dockerfile", context, name,
                                     no_cache=no_cache, echo=_echo)
    if build_id is None:
        sys.exit(1)
    click.echo(build_id)


@main.group()
def cache() -> None:
    """Derived data (layers, uploaded files) and published builds: verify, prune."""


@cache.command("verify")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def cache_verify(data_dir: Path | None) -> None:
    """Check every build, layer and uploaded COPY tar against its checksum (exit 1 if any is bad;
    bad layers and tars are removed, to be rebuilt or re-uploaded on demand)."""
    from sandboxd.templates.cache import Caches, verify

    report = verify(Caches.of(_settings(data_dir).data_dir), _echo)
    for kind, n in report.ok.items():
        click.echo(f"{kind}: {n} ok, {len(report.bad[kind])} corrupt")
    if not report.clean:
        sys.exit(1)


@cache.command("gc")
@click.option("--builds", "remove_builds", is_flag=True,
              help="Also remove published builds that no template name, tag or sandbox uses.")
@click.option("--min-age", type=float, default=3600.0, show_default=True,
              help="Keep cache entries used within this many seconds (builds in progress).")
@click.option("--dry-run", is_flag=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def cache_gc(remove_builds: bool, min_age: float, dry_run: bool, data_dir: Path | None) -> None:
    """Remove cached layers and files that no kept build needs, and leftovers of crashed builds."""
    from sandboxd.store.templates_db import TemplateBuilds
    from sandboxd.templates.cache import Caches, gc

    settings = _settings(data_dir)
    referenced = TemplateBuilds(Database(settings.db_url)).referenced_builds()
    report = gc(Caches.of(settings.data_dir), referenced, builds=remove_builds, min_age_s=min_age,
                dry_run=dry_run, log=_echo)
    verb = "would remove" if dry_run else "removed"
    click.echo(", ".join(f"{kind}: {verb} {len(names)}" for kind, names in report.removed.items()))


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--url", default=None, help="The server to reach (default: the configured host and port, where "
                                          "a stopped server is only a warning).")
@click.option("--quick", is_flag=True, help="Skip the slow checks (checksums, envd starting in each template).")
@click.option("--all", "everything", is_flag=True, help="Verify every build and cached layer, not only those in use.")
def doctor(data_dir: Path | None, url: str | None, quick: bool, everything: bool) -> None:
    """Check the host and the data dir; each problem with the command that fixes it (exit 1 on one)."""
    from sandboxd.doctor import Finding, Status, run_checks

    marks = {Status.OK: click.style("ok  ", fg="green"), Status.WARN: click.style("warn", fg="yellow"),
             Status.FAIL: click.style("FAIL", fg="red", bold=True)}

    def show(f: Finding) -> None:
        click.echo(f"[{marks[f.status]}] {f.check}: {f.detail}")
        if f.fix:
            click.echo(f"       fix: {f.fix}")

    findings = run_checks(_settings(data_dir), url=url, quick=quick, everything=everything, progress=show)
    failures = [f for f in findings if f.status is Status.FAIL]
    warnings = [f for f in findings if f.status is Status.WARN]
    click.echo(f"{len(findings)} checks: {len(failures)} failed, {len(warnings)} warnings")
    if failures:
        sys.exit(1)


@main.group()
def keys() -> None:
    """API keys (stored hashed)."""


def _limit_options(fn: Any) -> Any:
    for opt in (click.option("--max-sandboxes", type=click.IntRange(min=0), default=None,
                             help="Sandboxes it may have running at once."),
                click.option("--max-vcpus", type=click.IntRange(min=0), default=None,
                             help="vCPUs of its running sandboxes, in total."),
                click.option("--max-memory-mb", type=click.IntRange(min=0), default=None,
                             help="Memory of its running sandboxes, in total (MiB).")):
        fn = opt(fn)
    return fn


@keys.command("create")
@click.option("--name", default="cli")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@_limit_options
def keys_create(name: str, data_dir: Path | None, max_sandboxes: int | None, max_vcpus: int | None,
                max_memory_mb: int | None) -> None:
    """Create an API key and print it (it cannot be shown again); 0 or no limit option: unlimited."""
    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    click.echo(Database(settings.db_url).create_api_key(name, max_sandboxes or None, max_vcpus or None,
                                                        max_memory_mb or None))


@keys.command("list")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def keys_list(data_dir: Path | None) -> None:
    """Every key: id, name, mask, quotas and what its running sandboxes use."""
    db = Database(_settings(data_dir).db_url)
    running = [r for r in db.list_sandboxes() if r.state == "running"]
    click.echo(f"{'ID':<13}{'NAME':<20}{'KEY':<14}{'SANDBOXES':<12}{'VCPUS':<10}{'MEMORY MB':<14}CREATED")
    for k in db.list_api_keys():
        mine = [r for r in running if r.owner == k.key_hash]

        def used(n: int, limit: int | None) -> str:
            return f"{n}/{limit if limit is not None else '-'}"

        click.echo(f"{k.key_id:<13}{k.name[:19]:<20}{k.mask:<14}{used(len(mine), k.max_sandboxes):<12}"
                   f"{used(sum(r.cpu_count for r in mine), k.max_vcpus):<10}"
                   f"{used(sum(r.memory_mb for r in mine), k.max_memory_mb):<14}{k.created_at:%Y-%m-%d %H:%M}")


def _one_key(db: Database, ref: str) -> Any:
    found = db.find_api_keys(ref)
    if len(found) != 1:
        raise click.ClickException(f"{len(found)} keys match {ref!r}: name one by its id (sandboxd keys list)")
    return found[0]


@keys.command("revoke")
@click.argument("ref")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def keys_revoke(ref: str, data_dir: Path | None) -> None:
    """Revoke a key (by id or name): it is refused from the next request on. Its sandboxes run on
    until they end; an operator key can kill them."""
    db = Database(_settings(data_dir).db_url)
    key = _one_key(db, ref)
    db.delete_api_key(key.key_hash)
    click.echo(f"revoked {key.key_id} ({key.name}, {key.mask})")


@keys.command("limit")
@click.argument("ref")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@_limit_options
def keys_limit(ref: str, data_dir: Path | None, max_sandboxes: int | None, max_vcpus: int | None,
               max_memory_mb: int | None) -> None:
    """Set a key's quotas (0 in a field removes that limit); checked at each create and resume."""
    db = Database(_settings(data_dir).db_url)
    key = _one_key(db, ref)
    changes = {name: (None if value == 0 else value) for name, value in
               (("max_sandboxes", max_sandboxes), ("max_vcpus", max_vcpus), ("max_memory_mb", max_memory_mb))
               if value is not None}
    db.update_api_key(key.key_hash, **changes)
    click.echo(f"{key.key_id} ({key.name}): {changes or 'unchanged'}")
