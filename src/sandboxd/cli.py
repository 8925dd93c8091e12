"""``sandboxd`` command line: serve, build the base template, manage API keys."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from sandboxd.config import Settings
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
    build = build_base(TemplateStore(settings.templates_dir), _echo)
    db.set_template("base", build.build_id, runtime=settings.runtime)
    return build.build_id


def ensure_api_key(db: Database) -> str | None:
    """On the very first start, create an API key and return it (it is shown once, never stored)."""
    if db.count_api_keys():
        return None
    return db.create_api_key("first key")


def _settings(data_dir: Path | None, host: str | None = None, port: int | None = None) -> Settings:
    return Settings.from_env(data_dir=data_dir, host=host, port=port)


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
def serve(host: str | None, port: int | None, data_dir: Path | None) -> None:
    """Prepare the node (base template, first API key) and serve the API + proxy."""
    import uvicorn

    from sandboxd.server import build_app

    settings = _settings(data_dir, host, port)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.db_url)
    ensure_base_template(settings, db)
    key = ensure_api_key(db)
    url = f"http://{settings.host}:{settings.port}"
    if key:
        _echo("\n  Your API key (shown once; create more with `sandboxd keys create`):\n"
              f"\n    export E2B_API_KEY={key}\n")
    _echo(f"  export E2B_API_URL={url} E2B_SANDBOX_URL={url}\n")
    app = build_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, timeout_keep_alive=KEEP_ALIVE_S,
                log_level="info", access_log=False)


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


@main.group()
def keys() -> None:
    """API keys (stored hashed)."""


@keys.command("create")
@click.option("--name", default="cli")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def keys_create(name: str, data_dir: Path | None) -> None:
    """Create an API key and print it (it cannot be shown again)."""
    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    click.echo(Database(settings.db_url).create_api_key(name))
