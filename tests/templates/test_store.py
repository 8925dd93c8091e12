"""The content-addressed store: ids follow inputs, published builds are immutable and verified,
failures leave nothing behind."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sandboxd.templates.base import base_inputs
from sandboxd.templates.store import (
    Build,
    BuildError,
    BuildInputs,
    TemplateStore,
    remove_tree,
    tree_checksum,
)

INPUTS = BuildInputs(name="t", recipe="FROM scratch\n", packages=("a", "b"), mirror="http://m/debian",
                     envd_bundle_hash="h" * 64, extra=(("suite", "bookworm"),))


def _noop_log(msg: str) -> None:
    pass


def small_builder(rootfs: Path, log) -> None:
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "hostname").write_text("sandbox\n")
    (rootfs / "bin").mkdir()
    (rootfs / "bin" / "tool").write_bytes(b"\x7fELF-not-really" * 100)
    os.chmod(rootfs / "bin" / "tool", 0o755)
    (rootfs / "bin" / "link").symlink_to("tool")
    (rootfs / "tmp").mkdir(mode=0o1777)
    os.chmod(rootfs / "tmp", 0o1777)
    log("small build done")


def test_build_id_is_stable_and_changes_with_every_input():
    assert INPUTS.build_id == replace(INPUTS).build_id
    variants = [
        replace(INPUTS, name="u"),
        replace(INPUTS, recipe="FROM scratch\nRUN true\n"),
        replace(INPUTS, packages=("a",)),
        replace(INPUTS, packages=("b", "a")),
        replace(INPUTS, mirror="http://other/debian"),
        replace(INPUTS, envd_bundle_hash="i" * 64),
        replace(INPUTS, extra=(("suite", "trixie"),)),
    ]
    ids = {v.build_id for v in variants}
    assert INPUTS.build_id not in ids
    assert len(ids) == len(variants)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_base_build_id_follows_envd_bundle_and_mirror():
    a = base_inputs(mirror="http://deb.debian.org/debian", envd_hash="a" * 64)
    assert a.build_id == base_inputs(mirror="http://deb.debian.org/debian", envd_hash="a" * 64).build_id
    assert a.build_id != base_inputs(mirror="http://deb.debian.org/debian", envd_hash="b" * 64).build_id
    assert a.build_id != base_inputs(mirror="http://mirror.example/debian", envd_hash="a" * 64).build_id
    assert a.build_id != base_inputs(mirror="http://deb.debian.org/debian", envd_hash="a" * 64,
                                     envd_check="python").build_id


def test_build_publishes_meta_and_readonly_dir(tmp_store: TemplateStore):
    b = tmp_store.build(INPUTS, small_builder, _noop_log)
    assert isinstance(b, Build) and b.build_id == INPUTS.build_id
    assert b.rootfs == tmp_store.path(b.build_id) / "rootfs"
    assert (b.rootfs / "etc/hostname").read_text() == "sandbox\n"
    meta = json.loads((tmp_store.path(b.build_id) / "meta.json").read_text())
    assert meta["inputs"] == INPUTS.to_json()
    assert meta["rootfs"] == tree_checksum(b.rootfs)
    assert "small build done" in (tmp_store.path(b.build_id) / "build.log").read_text()
    assert oct(os.stat(tmp_store.path(b.build_id)).st_mode & 0o777) == oct(0o555)
    assert oct(os.stat(tmp_store.path(b.build_id) / "meta.json").st_mode & 0o777) == oct(0o444)
    # template semantics are kept: modes inside the rootfs are not touched
    assert os.stat(b.rootfs / "tmp").st_mode & 0o7777 == 0o1777
    assert tmp_store.verify(b.build_id)
    assert tmp_store.list() == [b.build_id]
    assert list((tmp_store.root / ".tmp").iterdir()) == []


def test_existing_build_is_never_rebuilt_or_modified(tmp_store: TemplateStore):
    b = tmp_store.build(INPUTS, small_builder, _noop_log)
    p = tmp_store.path(b.build_id)
    before = (os.stat(p).st_ino, os.stat(p / "meta.json").st_mtime_ns, tree_checksum(p))

    def must_not_run(rootfs: Path, log) -> None:
        raise AssertionError("builder ran for an existing build")

    b2 = tmp_store.build(INPUTS, must_not_run, _noop_log)
    assert b2 == b
    assert (os.stat(p).st_ino, os.stat(p / "meta.json").st_mtime_ns, tree_checksum(p)) == before


def test_verify_detects_flipped_byte(tmp_store: TemplateStore):
    b = tmp_store.build(INPUTS, small_builder, _noop_log)
    f = b.rootfs / "bin" / "tool"
    data = bytearray(f.read_bytes())
    data[7] ^= 0x01
    f.write_bytes(bytes(data))
    assert not tmp_store.verify(b.build_id)


@pytest.mark.parametrize("change", ["mode", "new_file", "symlink", "owner", "delete", "meta_inputs"])
def test_verify_detects_other_changes(tmp_store: TemplateStore, change: str):
    b = tmp_store.build(INPUTS, small_builder, _noop_log)
    r = b.rootfs
    if change == "mode":
        os.chmod(r / "bin" / "tool", 0o4755)
    elif change == "new_file":
        (r / "etc" / "extra").write_text("")
    elif change == "symlink":
        (r / "bin" / "link").unlink()
        (r / "bin" / "link").symlink_to("/bin/tool")
    elif change == "owner":
        os.chown(r / "etc" / "hostname", 1000, 1000)
    elif change == "delete":
        (r / "etc" / "hostname").unlink()
    elif change == "meta_inputs":
        meta_path = tmp_store.path(b.build_id) / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["inputs"]["mirror"] = "http://elsewhere"
        os.chmod(meta_path, 0o644)
        meta_path.write_text(json.dumps(meta))
    assert not tmp_store.verify(b.build_id)


def test_checksum_ignores_timestamps(tmp_store: TemplateStore):
    b = tmp_store.build(INPUTS, small_builder, _noop_log)
    os.utime(b.rootfs / "bin" / "tool", (1, 1))
    assert tmp_store.verify(b.build_id)


def test_corrupted_build_is_quarantined_and_rebuilt_not_patched(tmp_store: TemplateStore):
    b = tmp_store.build(INPUTS, small_builder, _noop_log)
    (b.rootfs / "etc" / "hostname").write_text("tampered\n")
    b2 = tmp_store.build(INPUTS, small_builder, _noop_log)
    assert b2.build_id == b.build_id and tmp_store.verify(b2.build_id)
    assert (b2.rootfs / "etc" / "hostname").read_text() == "sandbox\n"
    quarantined = list((tmp_store.root / ".corrupt").iterdir())
    assert len(quarantined) == 1
    assert (quarantined[0] / "rootfs" / "etc" / "hostname").read_text() == "tampered\n"


def test_failing_builder_leaves_nothing(tmp_store: TemplateStore):
    def failing(rootfs: Path, log) -> None:
        small_builder(rootfs, log)
        log("about to fail")
        raise RuntimeError("envd did not start")

    with pytest.raises(BuildError, match="envd did not start") as exc:
        tmp_store.build(INPUTS, failing, _noop_log)
    assert not tmp_store.exists(INPUTS.build_id)
    assert not tmp_store.path(INPUTS.build_id).exists()
    assert tmp_store.list() == []
    assert list((tmp_store.root / ".tmp").iterdir()) == []
    # ...but says why
    assert exc.value.log_path is not None and "about to fail" in exc.value.log_path.read_text()


def test_half_built_dir_is_never_visible(tmp_store: TemplateStore):
    seen = []

    def watching(rootfs: Path, log) -> None:
        small_builder(rootfs, log)
        seen.append((tmp_store.exists(INPUTS.build_id), tmp_store.path(INPUTS.build_id).exists()))

    tmp_store.build(INPUTS, watching, _noop_log)
    assert seen == [(False, False)]


def test_concurrent_builds_of_one_id_build_once(tmp_store: TemplateStore):
    calls = []

    def slow(rootfs: Path, log) -> None:
        calls.append(1)
        time.sleep(0.3)
        small_builder(rootfs, log)

    results: list[Build] = []
    threads = [threading.Thread(target=lambda: results.append(
        TemplateStore(tmp_store.root).build(INPUTS, slow, _noop_log))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len({r.build_id for r in results}) == 1 and len(results) == 3


def test_get_and_path_reject_unknown_or_bad_ids(tmp_store: TemplateStore):
    with pytest.raises(KeyError):
        tmp_store.get("0" * 32)
    with pytest.raises(ValueError):
        tmp_store.path("../etc")
    assert not tmp_store.exists("0" * 32)
    assert not tmp_store.verify("0" * 32)


def test_remove_tree_refuses_to_cross_mounts(tmp_path: Path):
    d = tmp_path / "rootfs"
    (d / "proc").mkdir(parents=True)
    os.system(f"mount -t tmpfs none {d / 'proc'}")
    try:
        with pytest.raises(BuildError, match="mounts"):
            remove_tree(d)
    finally:
        os.system(f"umount {d / 'proc'}")
    remove_tree(d)
    assert not d.exists()


def test_remove_deletes_a_build_completely(tmp_store: TemplateStore):
    b = tmp_store.build(INPUTS, small_builder, _noop_log)
    assert tmp_store.remove(b.build_id)
    assert not tmp_store.exists(b.build_id) and tmp_store.list() == []
    assert list((tmp_store.root / ".tmp").iterdir()) == []
    assert not tmp_store.remove(b.build_id)
