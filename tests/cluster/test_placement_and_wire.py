"""Placement's order and the API↔node wire, without a cluster (pure functions; the cluster
tests run them for real)."""

from __future__ import annotations

import dataclasses
import os
import random
from datetime import timedelta

import pytest

from sandboxd.cluster.placement import order
from sandboxd.cluster.wire import error_json, error_of, request_json, request_of
from sandboxd.orchestrator.egress import EgressPolicy
from sandboxd.orchestrator.sandboxes import CreateRequest, SandboxError
from sandboxd.store.db import utcnow
from sandboxd.store.nodes_db import NodeRow


def _node(node_id: str, free_vcpus: int = 16, free_mb: int = 8192, builds: list[str] | None = None,
          age_s: float = 1) -> NodeRow:
    return NodeRow(node_id=node_id, address=f"http://{node_id}", state="active", vcpus=16, memory_mb=8192,
                   free_vcpus=free_vcpus, free_memory_mb=free_mb, sandboxes=0, builds=builds or [],
                   heartbeat_at=utcnow() - timedelta(seconds=age_s))


def test_placement_skips_full_and_silent_nodes_and_prefers_the_build_then_room() -> None:
    nodes = [_node("full", free_vcpus=1), _node("silent", age_s=60), _node("roomy"),
             _node("has-build", free_vcpus=4, free_mb=1024, builds=["b1"]), _node("busy", free_vcpus=4, free_mb=1024)]
    got = [n.node_id for n in order(nodes, 2, 512, "b1", k=10, stale_after_s=15, now=utcnow(), rng=random.Random(1))]
    assert got == ["has-build", "roomy", "busy"]
    assert order(nodes, 2, 512, None, k=10, stale_after_s=15, now=utcnow())[0].node_id == "roomy"
    assert order(nodes, 32, 512, None, k=2, stale_after_s=15, now=utcnow()) == []  # nobody has 32 vCPUs free


def test_best_of_k_compares_only_k_then_tries_the_rest() -> None:
    nodes = [_node(f"n{i}", free_vcpus=i + 2) for i in range(6)]
    got = order(nodes, 1, 1, None, k=2, stale_after_s=15, now=utcnow(), rng=random.Random(7))
    assert len(got) == 6 and len({n.node_id for n in got}) == 6
    assert got[0].free_vcpus >= got[1].free_vcpus  # the two compared, best first
    assert [n.free_vcpus for n in got[2:]] == sorted((n.free_vcpus for n in got[2:]), reverse=True)


def test_a_create_request_crosses_the_wire_whole() -> None:
    req = CreateRequest(template="base:v2", timeout_s=77, metadata={"a": "b"}, env_vars={"X": "1"},
                        allow_internet_access=True,
                        egress=EgressPolicy.parse(True, ["198.51.100.7"], ["0.0.0.0/0"], None, "network"),
                        auto_pause=True, auto_pause_memory=False, auto_resume=False, secure=False,
                        allow_public_traffic=False, mask_request_host="h:${PORT}", https_ports=(8443,),
                        idempotency_key="k:1", owner="o", volume_mounts=({"volumeID": "v1", "path": "/data"},))
    assert request_of(request_json(req)) == req
    assert request_json(req)["snapshot"] is None
    # seed crosses as the snapshot's id (the node seeds from its own capture)
    carried = set(request_json(req)) - {"snapshot"} | {"seed"}
    assert carried == {f.name for f in dataclasses.fields(CreateRequest)}, "a new CreateRequest field must cross the wire"


def test_a_create_from_a_snapshot_names_it_on_the_wire() -> None:
    from pathlib import Path

    from sandboxd.orchestrator.sandboxes import Resources, Seed

    seed = Seed(captured=Path("sn1"), template_id="sn1", alias="named", build_id="b", runtime="gvisor",
                resources=Resources(2, 512, 1024))
    data = request_json(CreateRequest(template="named", timeout_s=60, seed=seed))
    assert data["snapshot"] == "sn1" and request_of(data).seed is None  # the node makes its own Seed


def test_an_error_crosses_the_wire_with_its_code_and_retry_hints() -> None:
    exc = SandboxError(503, "template 't' is still being built", "building", {"Retry-After": "10"})
    exc.final = True
    again = error_of(503, error_json(exc), {"retry-after": "10", "content-type": "application/json"})
    assert (again.status, again.message, again.error_code, again.final) == (503, exc.message, "building", True)
    assert again.headers == {"retry-after": "10"}


def test_a_fetched_build_is_published_only_with_the_recorded_checksum(tmp_path) -> None:
    """The checksum comes from the cluster's record, not the sender: a copy whose rootfs differs
    (or whose meta.json names another build) is removed and refused."""
    import json

    from sandboxd.templates.store import BuildError, TemplateStore, build_id_of, tree_checksum

    store = TemplateStore(tmp_path / "templates")
    inputs = {"name": "t", "format": "x", "recipe": "r"}
    build_id = build_id_of(inputs)

    def unpacked(content: str, claimed: str | None = None) -> tuple[str, object]:
        tmp = store.root / ".tmp" / f"{build_id}-fetch-{content}"
        (tmp / "rootfs").mkdir(parents=True)
        (tmp / "rootfs" / "f").write_text(content)
        sha = tree_checksum(tmp / "rootfs")["sha256"]
        meta = {"build_id": build_id, "inputs": inputs, "rootfs": {"sha256": claimed or sha}}
        (tmp / "meta.json").write_text(json.dumps(meta))
        return sha, tmp

    good_sha, _ = unpacked("good")
    remove = store.root / ".tmp" / f"{build_id}-fetch-good"
    import shutil

    shutil.rmtree(remove)
    _, bad = unpacked("evil")  # self-consistent, but not what the cluster recorded
    with pytest.raises(BuildError, match="checksum"):
        store.publish_fetched(build_id, bad, good_sha, print)  # type: ignore[arg-type]
    assert not bad.exists() and not store.exists(build_id)  # type: ignore[attr-defined]
    _, good = unpacked("good")
    store.publish_fetched(build_id, good, good_sha, print)  # type: ignore[arg-type]
    assert store.verify(build_id)


def test_a_capture_checksum_is_the_same_however_sparse_the_copy_and_catches_any_change(tmp_path) -> None:
    """What a node fetching a snapshot checks its copy with: a sparse image, a dense copy of it
    and its tar --sparse round trip sum alike; a changed byte, a cut file or a missing one do not."""
    import shutil
    import subprocess

    from sandboxd.orchestrator.snapshots import capture_checksum

    src = tmp_path / "src"
    src.mkdir()
    image = src / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
        f.seek(5 << 20)
        f.write(b"data" * 5000)
        f.seek(40 << 20)
        f.write(b"\1")
    (src / "guest.json").write_text("{}")
    want = capture_checksum(src)
    dense = tmp_path / "dense"
    dense.mkdir()
    subprocess.run(["cp", "--sparse=never", str(image), str(dense / "disk.img")], check=True)
    shutil.copy(src / "guest.json", dense)
    untarred = tmp_path / "untarred"
    untarred.mkdir()
    subprocess.run(f"tar --sparse -C {src} -cf - . | tar -C {untarred} -xf -", shell=True, check=True)
    assert capture_checksum(dense) == capture_checksum(untarred) == want
    with open(untarred / "disk.img", "r+b") as f:
        f.seek(30 << 20)  # inside a hole: a non-zero byte there is a change
        f.write(b"x")
    assert capture_checksum(untarred) != want
    os.truncate(dense / "disk.img", 32 << 20)
    assert capture_checksum(dense) != want
    (src / "guest.json").unlink()
    assert capture_checksum(src) != want


def test_only_a_gvisor_capture_with_a_recorded_checksum_moves() -> None:
    from sandboxd.cluster.snapshot_copies import movable, valid_id
    from sandboxd.store.snapshots_db import SnapshotRow

    def snap(runtime: str, checksum: str | None) -> SnapshotRow:
        return SnapshotRow(snapshot_id="s1", sandbox_id="x", template_id="t", build_id="b", runtime=runtime,
                           cpu_count=1, memory_mb=256, disk_size_mb=1024, node_id="n1", checksum=checksum)

    assert movable(snap("gvisor", "ab" * 32)) is None
    assert "before snapshots recorded a checksum" in (movable(snap("gvisor", None)) or "")
    assert "microvm capture" in (movable(snap("microvm", "ab" * 32)) or "")
    assert valid_id("abc-1_2") and not valid_id("../x") and not valid_id(".hidden")
