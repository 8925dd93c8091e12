"""FROM: the bottom of a build's layer stack.

- ``e2bdev/base`` (the SDK's default), ``debian:bookworm``/``debian:12`` and ``base`` are our
  ``base`` build (Debian bookworm made locally with debootstrap): works offline.
- ``fromTemplate``: another template's published build, with its env/user/workdir.
- Anything else is an OCI image, fetched with ``skopeo`` and unpacked with ``umoci`` (Debian
  packages): ``oci-archive:/path.tar[:tag]`` and ``oci:/dir[:tag]`` work offline, a registry on
  loopback (``127.0.0.1:5000/name:tag``, plain HTTP) works offline, and a public registry
  (``python:3.11``) works only with network access to it.

An image is identified by its manifest digest, never by its name or tag: a re-pushed tag is a new
layer key and so a new build. The unpacked image gets what E2B's base layer gives every image:
user ``user`` (uid 1000, passwordless sudo where sudo exists), /tmp, and its own network files.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandboxd.templates.base import GID, HOSTNAME, HOSTS, RESOLV_CONF, UID, USER, build_base
from sandboxd.templates.layers import LayerCache, layer_key
from sandboxd.templates.spec import BuildSpec, RegistryAuth
from sandboxd.templates.stepns import run_step
from sandboxd.templates.steps import BuildState, code_hash
from sandboxd.templates.store import TemplateStore

LogFn = Callable[[str], None]
BASE_IMAGE_NAMES = frozenset({"e2bdev/base", "base", "debian:bookworm", "debian:12"})
_LOOPBACK = ("localhost", "127.", "[::1]")
assert GID == UID  # provisioning gives the user a group of the same number


class ImageError(RuntimeError):
    """The base image cannot be had (unknown, unreachable, malformed)."""


@dataclass(frozen=True)
class BaseRootfs:
    """A verified, read-only directory to stack layers on, and what the build starts with."""

    key: str
    lower: Path
    state: BuildState
    source: dict[str, str]


def canonical_name(image: str) -> str:
    """``docker.io/library/debian:bookworm`` → ``debian:bookworm``; no tag → ``:latest``."""
    name = image.removeprefix("docker://").removeprefix("docker.io/").removeprefix("library/")
    last = name.rsplit("/", 1)[-1]
    return name if ("@" in last or ":" in last) else f"{name}:latest"


def is_base_image(image: str) -> bool:
    c = canonical_name(image)
    return c in BASE_IMAGE_NAMES or c.removesuffix(":latest") in BASE_IMAGE_NAMES


def resolve_base(spec: BuildSpec, store: TemplateStore, layers: LayerCache,
                 find_template: Callable[[str], str | None], log: LogFn, envd_hash: str | None = None) -> BaseRootfs:
    """The stack's bottom for ``spec``: a published build or an unpacked, provisioned image."""
    if spec.from_template:
        build_id = find_template(spec.from_template)
        if build_id is None or not store.exists(build_id):
            raise ImageError(f"template {spec.from_template!r} not found (or it has no ready build)")
        return from_build(store, build_id, log)
    assert spec.from_image
    if is_base_image(spec.from_image):
        log(f"{spec.from_image} is the local base build (Debian bookworm, debootstrap)")
        base = build_base(store, log, envd_hash=envd_hash)
        return from_build(store, base.build_id, log)
    return from_image(spec.from_image, spec.registry_auth, layers, log)


def from_build(store: TemplateStore, build_id: str, log: LogFn) -> BaseRootfs:
    if not store.verify(build_id):
        raise ImageError(f"build {build_id} does not verify; rebuild it")
    build = store.get(build_id)
    runtime = build.meta.get("runtime") or {}
    state = BuildState(env=dict(runtime.get("env") or {}), user=runtime.get("user") or USER,
                       workdir=runtime.get("workdir"))
    log(f"base: build {build_id} ({build.meta.get('name')}) verified")
    return BaseRootfs(key=layer_key("build", build_id), lower=build.rootfs, state=state,
                      source={"kind": "build", "build_id": build_id})


# ---------------------------------------------------------------------------------------------
# OCI images.


def transport_ref(image: str) -> str:
    """skopeo's source syntax: OCI layouts/archives as given, everything else a registry."""
    if image.startswith(("oci-archive:", "oci:", "docker://", "docker-archive:")):
        return image
    return f"docker://{image}"


def _skopeo_flags(ref: str, auth: RegistryAuth | None, prefix: str = "--") -> list[str]:
    flags = []
    if ref.startswith("docker://"):
        host = ref.removeprefix("docker://").split("/", 1)[0]
        if host.startswith(_LOOPBACK):
            flags.append(f"{prefix}tls-verify=false")
        if auth is not None:
            flags.append(f"{prefix}creds={auth.username}:{auth.password}")
    return flags


def _run(cmd: list[str], what: str, timeout: float = 1800) -> bytes:
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise ImageError(f"{cmd[0]} is not installed (apt-get install skopeo umoci)") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{what}: timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise ImageError(f"{what} failed: {proc.stderr.decode(errors='replace').strip()[-2000:]}")
    return proc.stdout


def inspect(ref: str, auth: RegistryAuth | None) -> tuple[str, dict[str, Any]]:
    """(manifest digest, image config) of an image, without pulling its layers."""
    raw = _run(["skopeo", "inspect", "--raw", *_skopeo_flags(ref, auth), ref], f"inspecting {ref}")
    config = json.loads(_run(["skopeo", "inspect", "--config", *_skopeo_flags(ref, auth), ref],
                             f"reading the config of {ref}"))
    return "sha256:" + hashlib.sha256(raw).hexdigest(), config


def _image_env(config: dict[str, Any]) -> dict[str, str]:
    env = {}
    for item in (config.get("config") or {}).get("Env") or []:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def from_image(image: str, auth: RegistryAuth | None, layers: LayerCache, log: LogFn) -> BaseRootfs:
    ref = transport_ref(image)
    log(f"resolving image {ref}")
    try:
        digest, config = inspect(ref, auth)
    except ImageError as exc:
        if ref.startswith("docker://"):
            raise ImageError(f"{exc}\n(without access to that registry, use FROM e2bdev/base or debian:bookworm "
                             "for the local base, or FROM oci-archive:/path/image.tar)") from exc
        raise
    key = layer_key("image", digest, code_hash())

    def make(diff: Path, _work: Path) -> None:
        pull_and_unpack(ref, auth, diff, log)
        provision(diff, log)

    layer, cached = layers.create(key, make, {"image": image, "digest": digest}, log)
    log(f"image {image} ({digest[:19]}) {'from the layer cache' if cached else 'unpacked and provisioned'}")
    return BaseRootfs(key=key, lower=layer.diff, state=BuildState(env=_image_env(config)),
                      source={"kind": "image", "image": image, "digest": digest})


def pull_and_unpack(ref: str, auth: RegistryAuth | None, rootfs: Path, log: LogFn) -> None:
    """skopeo copies the image into a scratch OCI layout; umoci unpacks it into ``rootfs``
    (ownership, modes, whiteouts of the image's own layers all applied)."""
    with tempfile.TemporaryDirectory(prefix="sandboxd-image-") as tmp:
        layout = f"{tmp}/layout:img"
        log(f"fetching {ref}")
        _run(["skopeo", "copy", *_skopeo_flags(ref, auth, "--src-"), ref, f"oci:{layout}"], f"fetching {ref}")
        log("unpacking image layers")
        rootfs.rmdir()  # umoci creates it
        _run(["umoci", "raw", "unpack", "--image", layout, str(rootfs)], "unpacking the image")


def provision(rootfs: Path, log: LogFn) -> None:
    spec = {"op": "provision", "root": str(rootfs), "user": {"name": USER, "uid": UID},
            "files": {"/etc/resolv.conf": RESOLV_CONF, "/etc/hosts": HOSTS, "/etc/hostname": HOSTNAME + "\n"}}
    res = run_step(spec, log, timeout=120)
    if res.returncode != 0:
        raise ImageError("provisioning the image failed:\n" + "\n".join(res.tail))
