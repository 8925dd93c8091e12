"""Real Dockerfile builds: every step kind, the layer cache, failures, the envd gate, FROM an OCI
archive and a loopback registry, and ``cache verify``/``gc``.

Builds FROM ``e2bdev/base`` reuse the shared test data dir (its base build and layer cache are
content-addressed, so reuse across runs is safe by construction); builds FROM a small busybox OCI
image run in a fresh data dir each, so nothing cached can make them pass.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from sandboxd.cli import main
from sandboxd.templates import builder as builder_mod
from sandboxd.templates.builder import StepFailed, builder_for
from sandboxd.templates.runtime import RuntimeConfig
from sandboxd.templates.spec import BuildSpec
from sandboxd.templates.store import TemplateStore
from sandboxd.testing.images import busybox_rootfs, loopback_registry, oci_archive, push

DOCKERFILE = """\
FROM e2bdev/base
ARG GREETING=hello
ENV APP_HOME=/opt/app GREETING_TEXT="$GREETING world"
RUN mkdir -p $APP_HOME && echo "built by $(whoami): $GREETING_TEXT" > $APP_HOME/built.txt
COPY app/ /opt/app/
COPY --chown=user:user --chmod=0750 run.sh /opt/app/bin/run.sh
WORKDIR /opt/app
RUN pwd > /opt/app/workdir.txt
USER user
RUN whoami > $HOME/whoami.txt && touch /opt/app/bin/user-can-write
CMD ["python3", "-m", "http.server", "8000"]
"""


def _context(root: Path, data: str = "v1\n", dockerfile: str = DOCKERFILE) -> Path:
    (root / "app").mkdir(parents=True, exist_ok=True)
    (root / "Dockerfile").write_text(dockerfile)
    (root / "app" / "main.py").write_text("print('hello from app')\n")
    (root / "app" / "data.txt").write_text(data)
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    return root


def cli_build(data_dir: Path, ctx: Path, name: str) -> tuple[str, str]:
    """``sandboxd template build``; (build id, progress output)."""
    res = CliRunner().invoke(main, ["template", "build", "-n", name, "--data-dir", str(data_dir), str(ctx)])
    assert res.exit_code == 0, res.stderr + str(res.exception)
    return res.stdout.strip(), res.stderr


def _mounts_under(*paths: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    return [t for t in targets if any(t.startswith(p) for p in paths)]


# -- FROM the base -----------------------------------------------------------------------------


def test_dockerfile_steps_all_take_effect(data_dir: Path, store: TemplateStore, tmp_path: Path):
    build_id, progress = cli_build(data_dir, _context(tmp_path / "ctx"), "test-df-steps")
    rootfs = store.get(build_id).rootfs
    assert (rootfs / "opt/app/built.txt").read_text() == "built by root: hello world\n"  # RUN + ENV + ARG
    assert (rootfs / "opt/app/data.txt").read_text() == "v1\n"  # COPY of a directory's contents
    run_sh = rootfs / "opt/app/bin/run.sh"
    assert (run_sh.stat().st_uid, run_sh.stat().st_mode & 0o7777) == (1000, 0o750)  # --chown/--chmod
    assert (rootfs / "opt/app/workdir.txt").read_text() == "/opt/app\n"  # WORKDIR
    assert (rootfs / "home/user/whoami.txt").read_text() == "user\n"  # USER
    assert (rootfs / "opt/app/bin/user-can-write").stat().st_uid == 1000
    assert (rootfs / "opt/sandboxd/bin/python3").exists()  # envd injected
    runtime = RuntimeConfig.of(store.get(build_id))
    assert runtime.env == {"GREETING": "hello", "APP_HOME": "/opt/app", "GREETING_TEXT": "hello world"}
    assert (runtime.user, runtime.workdir) == ("user", "/opt/app")
    assert runtime.start_cmd == "python3 -m http.server 8000"
    assert "[5/11] RUN mkdir -p $APP_HOME" in progress
    assert store.verify(build_id)


def test_rebuilds_are_cached_and_a_changed_copy_source_is_a_new_build(data_dir: Path, store: TemplateStore,
                                                                     tmp_path: Path):
    ctx = _context(tmp_path / "ctx", data="first bytes\n")
    first, _ = cli_build(data_dir, ctx, "test-df-rebuild")
    published = (store.path(first) / "meta.json").stat().st_mtime_ns
    again, progress = cli_build(data_dir, ctx, "test-df-rebuild")
    assert again == first
    assert "layers from the cache" in progress and "CACHED" in progress and "flattening" not in progress
    assert (store.path(first) / "meta.json").stat().st_mtime_ns == published  # served, not rebuilt
    new_bytes = "second bytes\n"
    (ctx / "app" / "data.txt").write_text(new_bytes)
    second, progress = cli_build(data_dir, ctx, "test-df-rebuild")
    assert second != first
    run_step = '[5/11] RUN mkdir -p $APP_HOME && echo "built by $(whoami): $GREETING_TEXT" > $APP_HOME/built.txt'
    assert f"{run_step}: CACHED" in progress  # steps before the COPY come from the cache
    assert (store.get(second).rootfs / "opt/app/data.txt").read_text() == new_bytes
    assert (store.get(first).rootfs / "opt/app/data.txt").read_text() == "first bytes\n"  # never mutated
    assert store.verify(first) and store.verify(second)


def test_a_failed_step_is_named_with_its_output_and_nothing_is_published(data_dir: Path, store: TemplateStore,
                                                                        tmp_path: Path):
    marker = uuid.uuid4().hex
    ctx = _context(tmp_path / "ctx", dockerfile=f"FROM e2bdev/base\nRUN echo ok\nRUN echo {marker} && ls /nope\n")
    before = set(store.list())
    layer_tmp = data_dir / "cache" / "layers" / ".tmp"
    tmp_before = set(layer_tmp.glob("*"))  # a killed earlier run's leftovers are not this build's
    res = CliRunner().invoke(main, ["template", "build", "-n", "test-df-fail", "--data-dir", str(data_dir), str(ctx)])
    assert res.exit_code == 1
    assert "build failed at step 4" in res.stderr  # USER root, WORKDIR /, RUN echo ok, RUN ... ls
    assert marker in res.stderr and "No such file or directory" in res.stderr
    # The store is shared with concurrent runs: only this template's builds are ours to check.
    assert [b for b in set(store.list()) - before if store.get(b).meta.get("name") == "test-df-fail"] == []
    assert set(layer_tmp.glob("*")) - tmp_before == set()
    assert _mounts_under(str(data_dir / "cache"), "/tmp/sandboxd-step-") == []


def test_from_template_starts_from_its_build_and_its_runtime_config(data_dir: Path, store: TemplateStore,
                                                                   tmp_path: Path):
    parent, _ = cli_build(data_dir, _context(tmp_path / "ctx"), "test-df-parent")
    builder = builder_for(data_dir, find_template=lambda ref: parent if ref == "test-df-parent" else None)
    spec = BuildSpec.from_json({"fromTemplate": "test-df-parent", "steps": [
        {"type": "RUN", "args": ["echo \"$GREETING_TEXT as $(whoami) in $(pwd)\" > /home/user/child.txt"]}]})
    child = builder.build(spec, _emit_to([])).build
    assert (child.rootfs / "home/user/child.txt").read_text() == "hello world as user in /opt/app\n"
    assert (child.rootfs / "opt/app/data.txt").read_text() == "v1\n"
    assert RuntimeConfig.of(child).workdir == "/opt/app"
    with pytest.raises(StepFailed, match="not found"):
        builder.build(BuildSpec.from_json({"fromTemplate": "no-such-template"}), _emit_to([]))


# -- FROM an OCI image (fresh data dirs) -------------------------------------------------------


@pytest.fixture(scope="module")
def busybox_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("image")
    busybox_rootfs(d / "rootfs")
    oci_archive(d / "rootfs", d / "busybox.tar", tag="1", env={"PATH": "/bin", "IMAGE_ENV": "from-image"})
    return d / "busybox.tar"


def _emit_to(lines: list[str]):
    return lambda level, message, step: lines.append(f"{level} {step} {message}")


def _image_spec(image: str) -> BuildSpec:
    return BuildSpec.from_json({"fromImage": image, "steps": [
        {"type": "RUN", "args": ["echo \"$(whoami) in $(pwd) with $IMAGE_ENV\" > /tmp/run.txt"]},
        {"type": "ENV", "args": ["PATH", "/opt/tools:$PATH"]},
    ]})


def test_from_an_oci_archive_and_from_a_loopback_registry(tmp_path: Path, busybox_archive: Path):
    builder = builder_for(tmp_path / "data")
    lines: list[str] = []
    result = builder.build(_image_spec(f"oci-archive:{busybox_archive}:1"), _emit_to(lines))
    rootfs = result.build.rootfs
    assert (rootfs / "tmp/run.txt").read_text() == "user in /home/user with from-image\n"  # provisioned user
    assert "user:x:1000:1000" in (rootfs / "etc/passwd").read_text()
    assert not (rootfs / "usr/bin/python3").exists()  # no Python, no libc: envd brings its own
    assert RuntimeConfig.of(result.build).env == {"PATH": "/opt/tools:/bin", "IMAGE_ENV": "from-image"}
    with loopback_registry(tmp_path / "registry") as registry:
        ref = push(busybox_archive, "1", registry, "busybox")
        lines.clear()
        again = builder.build(_image_spec(ref), _emit_to(lines))
    assert again.build.build_id == result.build.build_id  # same digest, same steps: same build
    assert any("from the layer cache" in line for line in lines)


def test_the_envd_gate_refuses_a_rootfs_where_envd_does_not_start(tmp_path: Path, busybox_archive: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    def broken_bundle(dest: Path) -> str:
        (dest / "bin").mkdir(parents=True)
        (dest / "bin" / "python3").write_text("#!/bin/sh\nexit 1\n")  # seed 000: envd that never starts
        return "0" * 64

    monkeypatch.setattr(builder_mod, "bundle_hash", lambda: "0" * 64)
    monkeypatch.setattr(builder_mod, "build_envd_bundle", broken_bundle)
    builder = builder_for(tmp_path / "data")
    with pytest.raises(StepFailed) as failed:
        builder.build(_image_spec(f"oci-archive:{busybox_archive}:1"), _emit_to([]))
    assert failed.value.step == "finalize" and "bundled python does not start" in str(failed.value)
    assert builder.store.list() == []


def test_cache_verify_finds_corruption_and_gc_prunes(tmp_path: Path, busybox_archive: Path):
    data = tmp_path / "data"
    builder = builder_for(data)
    build = builder.build(_image_spec(f"oci-archive:{busybox_archive}:1"), _emit_to([])).build
    run = CliRunner()
    res = run.invoke(main, ["cache", "verify", "--data-dir", str(data)])
    assert res.exit_code == 0 and "layers: 3 ok, 0 corrupt" in res.stdout  # image, RUN, envd
    layer = next(k for k in builder.layers.list() if (builder.layers.path(k) / "diff" / "tmp" / "run.txt").exists())
    (builder.layers.path(layer) / "diff" / "tmp" / "run.txt").write_text("stale bytes\n")
    res = run.invoke(main, ["cache", "verify", "--data-dir", str(data)])
    assert res.exit_code == 1 and "CORRUPT layer " + layer in res.stderr
    assert layer not in builder.layers.list()  # moved aside; the next build makes it again
    rebuilt = builder.build(_image_spec(f"oci-archive:{busybox_archive}:1"), _emit_to([])).build
    assert rebuilt.build_id == build.build_id and (rebuilt.rootfs / "tmp/run.txt").read_text().startswith("user")
    images = data / "boot-images"
    (images / build.build_id / "1cpu-512mb").mkdir(parents=True)  # a microVM booted image of the build
    (images / build.build_id / ".1cpu-512mb.0a1b2c3d").mkdir()  # one a killed server left half-made
    (images / ("f" * 32) / "2cpu-1024mb").mkdir(parents=True)  # of a build removed by hand
    res = run.invoke(main, ["cache", "gc", "--min-age", "0", "--data-dir", str(data)])
    assert res.exit_code == 0, res.stderr
    assert "builds: removed 0, boot-images: removed 1" in res.stdout  # and the half-made one, as a leftover
    assert [p.name for p in images.iterdir()] == [build.build_id]
    assert [p.name for p in (images / build.build_id).iterdir()] == ["1cpu-512mb"]
    res = run.invoke(main, ["cache", "gc", "--builds", "--min-age", "0", "--data-dir", str(data)])
    assert res.exit_code == 0, res.stderr
    assert "builds: removed 1, boot-images: removed 1" in res.stdout  # nothing points at it
    assert builder.layers.list() == [] and builder.store.list() == [] and list(images.iterdir()) == []
