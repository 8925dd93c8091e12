"""The pieces of Dockerfile builds that need no root filesystem: the build spec, the COPY files
hash (checked against the SDK's own code), COPY placement, ENV/WORKDIR state, layer keys and the
layer cache's verification."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from e2b.template.utils import calculate_files_hash, tar_file_stream

from sandboxd.templates.files import FilesCache, FilesError, files_hash_of_tar
from sandboxd.templates.layers import LayerCache, layer_key, mark_opaque, read_from_stack
from sandboxd.templates.spec import BuildSpec, SpecError, Step
from sandboxd.templates.stepns import plan_copy
from sandboxd.templates.steps import BuildState, expand, home_of, next_state

# -- spec --------------------------------------------------------------------------------------


def test_spec_takes_the_sdk_body_as_is():
    spec = BuildSpec.from_json({
        "fromImage": "e2bdev/base", "force": False, "startCmd": "python app.py", "readyCmd": "sleep 1",
        "steps": [{"type": "COPY", "args": ["app", "/app", "", "0755"], "force": False, "filesHash": "a" * 64},
                  {"type": "ENV", "args": ["A", "1", "B", "2"], "force": False},
                  {"type": "RUN", "args": ["echo hi", "root"], "force": True},
                  {"type": "WORKDIR", "args": ["/app"], "force": False},
                  {"type": "USER", "args": ["user"], "force": False}]})
    assert [s.type for s in spec.steps] == ["COPY", "ENV", "RUN", "WORKDIR", "USER"]
    assert spec.steps[2].force and spec.start_cmd == "python app.py"
    assert spec.steps[0].describe() == "COPY --chmod=0755 app /app"
    assert BuildSpec.from_json({"steps": []}).from_image == "e2bdev/base"


@pytest.mark.parametrize("body, needle", [
    ({"steps": [{"type": "ADD", "args": ["a", "b"]}]}, "unsupported step type"),
    ({"steps": [{"type": "COPY", "args": ["a", "b"]}]}, "filesHash"),
    ({"steps": [{"type": "ENV", "args": ["A"]}]}, "at least 2"),
    ({"steps": [{"type": "ENV", "args": ["A", "1", "B"]}]}, "key/value"),
    ({"steps": [{"type": "RUN", "args": ["  "]}]}, "empty"),
    ({"fromImage": "a", "fromTemplate": "b"}, "not both"),
    ({"fromImageRegistry": {"type": "aws"}}, "not supported"),
])
def test_spec_rejects_what_cannot_be_built(body, needle):
    with pytest.raises(SpecError, match=needle):
        BuildSpec.from_json(body)


# -- COPY files hash ---------------------------------------------------------------------------


@pytest.fixture
def context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "app" / "sub").mkdir(parents=True)
    (ctx / "app" / "main.py").write_text("print('hi')\n")
    (ctx / "app" / "run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(ctx / "app" / "run.sh", 0o755)
    (ctx / "app" / "sub" / "data.bin").write_bytes(bytes(range(256)) * 100)
    (ctx / "app" / ".hidden").write_text("dot\n")
    (ctx / "app" / "link").symlink_to("main.py")
    os.link(ctx / "app" / "main.py", ctx / "app" / "hard.py")
    (ctx / "notes.txt").write_text("notes\n")
    return ctx


def _sdk_tar(src: str, ctx: Path, dest: Path, gzip: bool) -> Path:
    with tar_file_stream(src, str(ctx), [], False, gzip) as f:
        dest.write_bytes(f.read())
    return dest


@pytest.mark.parametrize("src, gzip", [("app", True), ("app", False), ("notes.txt", True), ("app/*.py", True),
                                       (".", False)])
def test_files_hash_recomputed_from_the_upload_equals_the_sdks(context, tmp_path, src, gzip):
    tar = _sdk_tar(src, context, tmp_path / "up.tar", gzip)
    assert files_hash_of_tar(tar, src, "/dest/") == calculate_files_hash(src, "/dest/", str(context), [], False, None)


def test_a_tampered_upload_is_refused_and_forgotten(context, tmp_path):
    files = FilesCache(tmp_path / "files")
    good = calculate_files_hash("app", "/app", str(context), [], False, None)
    (context / "app" / "main.py").write_text("print('other')\n")  # not what the hash says
    files.put(good, _sdk_tar("app", context, tmp_path / "up.tar", True).read_bytes())
    assert files.present(good)
    with pytest.raises(FilesError, match="do not match"):
        files.verified(good, "app", "/app")
    assert not files.present(good)  # the SDK will upload again next time


def test_an_upload_that_escapes_is_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../../etc/passwd")
        tar.addfile(info)
    with pytest.raises(FilesError, match="unsafe path"):
        FilesCache(tmp_path / "files").put("b" * 64, evil.read_bytes())


# -- COPY placement ----------------------------------------------------------------------------


def _members(*names: str) -> list[tarfile.TarInfo]:
    out = []
    for n in names:
        m = tarfile.TarInfo(n.rstrip("/"))
        m.type = tarfile.DIRTYPE if n.endswith("/") else tarfile.REGTYPE
        out.append(m)
    return out


def _targets(plan):
    placed, into_dir = plan
    return {m.name: t for m, t in placed}, into_dir


def test_copy_of_a_single_file_goes_to_or_into_dest():
    m = _members("notes.txt")
    assert _targets(plan_copy(m, "notes.txt", "/etc/n.txt", lambda p: False)) == ({"notes.txt": "/etc/n.txt"}, False)
    assert _targets(plan_copy(m, "notes.txt", "/etc/", lambda p: False)) == ({"notes.txt": "/etc/notes.txt"}, False)
    assert _targets(plan_copy(m, "notes.txt", "/etc", lambda p: True)) == ({"notes.txt": "/etc/notes.txt"}, False)


def test_copy_of_a_directory_or_glob_places_its_contents():
    m = _members("app/", "app/main.py", "app/sub/", "app/sub/x")
    targets, into = _targets(plan_copy(m, "app", "/srv", lambda p: False))
    assert into and targets == {"app/main.py": "/srv/main.py", "app/sub": "/srv/sub", "app/sub/x": "/srv/sub/x"}
    targets, _ = _targets(plan_copy(_members("app/main.py", "app/b.py"), "app/*.py", "/srv/", lambda p: False))
    assert targets == {"app/main.py": "/srv/main.py", "app/b.py": "/srv/b.py"}
    with pytest.raises(FileNotFoundError):
        plan_copy(m, "other", "/srv", lambda p: False)


# -- state -------------------------------------------------------------------------------------


def test_env_expands_against_the_env_so_far():
    s = next_state(BuildState(), Step("ENV", ("A", "1", "B", "${A}2", "PATH", "/opt/bin:$PATH")), "/home/user")
    assert s.env["B"] == "12"
    assert s.env["PATH"].startswith("/opt/bin:/usr/local/sbin:")
    assert expand("$UNSET-x", {}) == "-x"


def test_workdir_is_relative_to_the_previous_one_or_home():
    s = next_state(BuildState(), Step("WORKDIR", ("app",)), "/home/user")
    assert s.workdir == "/home/user/app"
    assert next_state(s, Step("WORKDIR", ("../lib",)), "/x").workdir == "/home/user/lib"
    assert next_state(s, Step("USER", ("root",)), "/x").user == "root"
    assert home_of("user", b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/bash\n") == "/home/user"
    assert home_of("1000", b"user:x:1000:1000::/home/u:/bin/sh\n") == "/home/u"
    assert home_of("nobody", b"") is None


# -- layers ------------------------------------------------------------------------------------


def test_layer_keys_follow_every_part():
    base = layer_key("step", "code", "parent", {"type": "RUN", "args": ["x"]})
    assert base == layer_key("step", "code", "parent", {"type": "RUN", "args": ["x"]})
    assert len({base, layer_key("step", "code2", "parent", {"type": "RUN", "args": ["x"]}),
                layer_key("step", "code", "parent2", {"type": "RUN", "args": ["x"]}),
                layer_key("step", "code", "parent", {"type": "RUN", "args": ["y"]})}) == 4


def test_a_layer_is_made_once_verified_on_use_and_never_repaired(tmp_path):
    cache = LayerCache(tmp_path / "layers")
    key = layer_key("t")
    calls = []

    def make(diff: Path, work: Path) -> None:
        calls.append(1)
        (diff / "etc").mkdir()
        (diff / "etc" / "f").write_text("v1")

    layer, hit = cache.create(key, make, {})
    assert not hit and (layer.diff / "etc" / "f").read_text() == "v1"
    assert cache.create(key, make, {})[1] is True and len(calls) == 1
    (layer.diff / "etc" / "f").write_text("tampered")  # what a stale cache would serve
    assert cache.get(key) is None  # detected, moved aside
    assert not cache.path(key).exists() and any((tmp_path / "layers" / ".corrupt").iterdir())
    layer, hit = cache.create(key, make, {})
    assert not hit and (layer.diff / "etc" / "f").read_text() == "v1"


def test_a_failed_maker_leaves_nothing(tmp_path):
    cache = LayerCache(tmp_path / "layers")

    def make(diff: Path, work: Path) -> None:
        (diff / "half").write_text("x")
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError):
        cache.create(layer_key("f"), make, {})
    assert cache.list() == [] and list((tmp_path / "layers" / ".tmp").iterdir()) == []


def test_a_killed_makers_half_layer_is_removed_by_the_next_maker_of_its_key(tmp_path):
    """SIGKILL skips a maker's cleanup; the next maker of the key (holding its lock) removes it,
    and leaves another key's work alone."""
    cache = LayerCache(tmp_path / "layers")
    key, other = layer_key("killed"), layer_key("other")
    tmp = tmp_path / "layers" / ".tmp"
    for name in (f"{key}-0badf00d", f"{other}-0badf00d"):
        (tmp / name / "work" / "work").mkdir(parents=True)
        (tmp / name / "work" / "work").chmod(0)  # as overlayfs leaves it

    def make(diff: Path, work: Path) -> None:
        (diff / "f").write_text("v")

    cache.create(key, make, {})
    assert sorted(p.name for p in tmp.iterdir()) == [f"{other}-0badf00d"]


def test_reading_through_a_stack_honours_whiteouts_and_opaque_dirs(tmp_path):
    low, mid, top = (tmp_path / n for n in ("low", "mid", "top"))
    for d in (low, mid, top):
        (d / "etc").mkdir(parents=True)
    (low / "etc" / "passwd").write_text("low")
    (low / "etc" / "gone").write_text("low")
    (mid / "etc" / "passwd").write_text("mid")
    os.mknod(mid / "etc" / "gone", 0o600 | 0o020000, os.makedev(0, 0))  # a whiteout
    assert read_from_stack([top, mid, low], "etc/passwd") == b"mid"
    assert read_from_stack([top, mid, low], "etc/gone") is None
    mark_opaque(top / "etc")
    assert read_from_stack([top, mid, low], "etc/passwd") is None
