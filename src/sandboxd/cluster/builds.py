"""Template builds between nodes: built once, fetched by other nodes by build id, verified.

A node that is asked for a sandbox of a build it does not hold fetches it from a node that does
(``nodes.builds``, freshest first) through that node's internal API (``GET /internal/v1/builds/
<id>``: a tar of ``meta.json``, ``build.log`` and ``rootfs/``), unpacks it into its store's ``.tmp`` and publishes
it only if its rootfs checksum is the one the cluster recorded when the build was made
(``build_checksums``, written by the building node) — never the sender's own word
(``TemplateStore.publish_fetched``). A corrupt or wrong copy is removed and the next holder tried.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx

from sandboxd.cluster.auth import SECRET_HEADER
from sandboxd.cluster.node_api import PREFIX
from sandboxd.cluster.tls import ClusterTls
from sandboxd.store.nodes_db import Nodes
from sandboxd.templates.store import BuildError, TemplateStore, remove_tree

log = logging.getLogger("sandboxd.cluster")
CHUNK = 1 << 20


def checksums_of(store: TemplateStore, skip: set[str]) -> dict[str, str]:
    """Rootfs checksums (from meta.json: the store verified them when they were built or
    fetched) of the builds this store holds, but those in ``skip``."""
    out: dict[str, str] = {}
    for build_id in store.list():
        if build_id in skip:
            continue
        try:
            sha = store.get(build_id).meta.get("rootfs", {}).get("sha256")
        except (KeyError, ValueError, OSError):
            continue
        if isinstance(sha, str):
            out[build_id] = sha
    return out


def tar_stream(store: TemplateStore, build_id: str) -> Iterator[bytes]:
    """A published build as a tar (numeric owners, modes, devices kept), streamed."""
    return stream_tar(["--numeric-owner", "-C", str(store.path(build_id)), "-cf", "-", "meta.json", "build.log",
                       "rootfs"], f"build {build_id}")


def stream_tar(args: list[str], what: str) -> Iterator[bytes]:
    """``tar <args>``'s output in chunks, for a node sending ``what`` to another (a failed tar
    is logged: the receiver's checksum refuses the partial copy)."""
    proc = subprocess.Popen(["tar", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        while chunk := proc.stdout.read(CHUNK):
            yield chunk
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            log.warning("sending %s: tar exited with %s", what, proc.returncode)


class BuildFetcher:
    """``fetch(build_id) -> bool``: the build is in this node's store afterwards (or False: no
    holder could give a copy that verifies, or the cluster has no checksum recorded for it)."""

    def __init__(self, store: TemplateStore, nodes: Nodes, node_id: str, secret: str,
                 tls: ClusterTls | None = None) -> None:
        self.store = store
        self.nodes = nodes
        self.node_id = node_id
        self._headers = {SECRET_HEADER.decode(): secret}
        self._tls = tls
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def __call__(self, build_id: str) -> bool:
        with self._guard:
            lock = self._locks.setdefault(build_id, threading.Lock())
        with lock:  # one download per build; others wait for it
            if self.store.exists(build_id):
                return True
            expected = self.nodes.checksum(build_id)
            if expected is None:
                log.warning("build %s: no checksum recorded in the cluster; cannot fetch it verified", build_id)
                return False
            for holder in self.nodes.holders(build_id):
                if holder.node_id == self.node_id:
                    continue
                try:
                    self._fetch_from(holder.node_id, holder.address, build_id, expected)
                    return True
                except (httpx.HTTPError, BuildError, OSError) as exc:
                    log.warning("build %s from node %s: %s", build_id, holder.node_id, exc)
            return False

    def _fetch_from(self, node_id: str, address: str, build_id: str, expected: str) -> None:
        tmp = self.store.root / ".tmp" / f"{build_id}-fetch-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        log.info("fetching build %s from node %s", build_id, node_id)
        try:
            _download_into(f"{address.rstrip('/')}{PREFIX}/builds/{build_id}", self._headers, tmp,
                           ClusterTls.verify(self._tls))
        except BaseException:
            remove_tree(tmp)
            raise
        self.store.publish_fetched(build_id, tmp, expected, lambda m: log.info("%s", m))
        log.info("build %s fetched from node %s and verified (rootfs %s…)", build_id, node_id, expected[:12])


def _download_into(url: str, headers: dict[str, str], dest: Path, verify: ssl.SSLContext | bool = True) -> None:
    """Stream the tar at ``url`` into ``tar -x`` in ``dest`` (owners and modes as sent)."""
    tar = subprocess.Popen(["tar", "--numeric-owner", "--same-owner", "--same-permissions", "-C", str(dest),
                            "-xf", "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tar.stdin is not None
    try:
        with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(60.0, connect=3.0), verify=verify) as res:
            if res.status_code != 200:
                raise BuildError(f"node answered {res.status_code}")
            for chunk in res.iter_raw(CHUNK):
                tar.stdin.write(chunk)
        tar.stdin.close()
    except BaseException:
        tar.kill()
        tar.wait()
        raise
    assert tar.stderr is not None
    err = tar.stderr.read()
    if tar.wait() != 0:
        raise BuildError(f"unpacking failed: {err.decode(errors='replace')[-300:]}")


def fetch_base(store: TemplateStore, nodes: Nodes, node_id: str, secret: str, tls: ClusterTls | None = None) -> bool:
    """A node joining a cluster takes the ``base`` build another node made (verified) instead of
    building it again; False: nobody has it yet (the caller builds it)."""
    from sandboxd.templates.base import base_inputs

    build_id = base_inputs().build_id
    return store.exists(build_id) or BuildFetcher(store, nodes, node_id, secret, tls)(build_id)
