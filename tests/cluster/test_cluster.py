"""A real cluster on this machine: PostgreSQL, two API replicas and three nodes, each node in its
own network namespace with its own address (testing/cluster.py), driven by the real ``e2b`` SDK
through either replica; then failures: kill -9 of a node, of an API replica, a PostgreSQL restart.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import NotFoundException, SandboxException, ServiceBusyException
from e2e.hostcheck import CLEAN, traces  # tests/ is on sys.path (rootdir packages)

from sandboxd.store.nodes_db import ACTIVE, DRAINING, GONE, Nodes
from sandboxd.testing.cluster import Cluster, Proc, running_cluster, wait_api, wait_node

pytestmark = pytest.mark.slow

#: the issue's bound on reporting a dead node's sandboxes gone (the default node_timeout_s is 15)
GONE_WITHIN_S = 30


@pytest.fixture(scope="module")
def cluster(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("cluster")
    c = None
    try:
        with running_cluster(data_dir, logs, apis=2, nodes=3, own_templates=(3,)) as c:
            yield c
    finally:
        if c is not None:
            print(c.logs())


def _opts(cluster: Cluster, api: Proc) -> dict[str, Any]:
    return {"api_key": cluster.api_key, "api_url": api.url, "sandbox_url": api.url}


def _node_of(cluster: Cluster, sandbox_id: str) -> Proc:
    row = cluster.db().get_sandbox(sandbox_id)
    assert row is not None
    return next(n for n in cluster.nodes if n.name == row.node_id)


def test_the_sdk_drives_sandboxes_through_either_api_replica(cluster: Cluster) -> None:
    a, b = cluster.apis
    made = [Sandbox.create(timeout=120, metadata={"n": str(i)}, **_opts(cluster, a if i % 2 else b))
            for i in range(4)]
    try:
        nodes = {_node_of(cluster, s.sandbox_id).name for s in made}
        assert nodes <= {"node1", "node2", "node3"}
        for i, sbx in enumerate(made):
            other = b if i % 2 else a  # created through one replica, used through the other
            again = Sandbox.connect(sbx.sandbox_id, **_opts(cluster, other))
            assert again.commands.run(f"echo {i} $((40+2))").stdout == f"{i} 42\n"
            again.files.write("/tmp/f.txt", f"file {i}")
            assert sbx.files.read("/tmp/f.txt") == f"file {i}"
            if i == 0:  # sampled by its node, read through the other replica
                samples = again.get_metrics()
                assert samples and samples[0].cpu_count >= 1 and samples[0].mem_total > 0
        for api in (a, b):
            listed = {s.sandbox_id for s in Sandbox.list(**_opts(cluster, api)).next_items()}
            assert {s.sandbox_id for s in made} <= listed
        info = Sandbox.get_info(made[0].sandbox_id, **_opts(cluster, b))
        assert info.metadata == {"n": "0"}
        made[1].set_timeout(200)
    finally:
        for i, sbx in enumerate(made):
            assert Sandbox.kill(sbx.sandbox_id, **_opts(cluster, b if i % 2 else a))
    db = cluster.db()
    assert all(db.get_sandbox(s.sandbox_id) is None for s in made)
    # logs stay on the node that ran the sandbox; either replica reads them, also after the kill
    for api in (a, b):
        res = httpx.get(f"{api.url}/v2/sandboxes/{made[0].sandbox_id}/logs", headers={"X-API-Key": cluster.api_key})
        messages = [e["message"] for e in res.json()["logs"]]
        assert res.status_code == 200 and any(m.startswith("Sandbox created") for m in messages), messages
        assert "Sandbox killed" in messages
    res = httpx.get(f"{a.url}/v2/sandboxes/nosuchsandbox/logs", headers={"X-API-Key": cluster.api_key})
    assert res.status_code == 404 and res.json()["code"] == 404


def test_a_node_fetches_a_build_by_id_and_verifies_it(cluster: Cluster) -> None:
    """node3 started with an empty template store: it took ``base`` from another node, checked
    against the checksum the building node recorded, and runs sandboxes of it."""
    from sandboxd.templates.store import TemplateStore

    node3 = cluster.nodes[2]
    db = cluster.db()
    base = db.find_template("base")
    assert base is not None
    own = node3.settings.templates_dir
    assert not own.is_symlink() and TemplateStore(own).verify(base.build_id)
    assert f"build {base.build_id} fetched from node" in node3.log() and "verified" in node3.log()
    assert Nodes(db).checksum(base.build_id) is not None
    nodes = Nodes(db)
    for n in cluster.nodes[:2]:
        nodes.set_state(n.name, DRAINING)
    try:
        sbx = Sandbox.create(timeout=60, **_opts(cluster, cluster.apis[0]))
        assert _node_of(cluster, sbx.sandbox_id) is node3
        assert sbx.commands.run("cat /etc/debian_version").exit_code == 0
        sbx.kill()
    finally:
        for n in cluster.nodes[:2]:
            nodes.set_state(n.name, ACTIVE)


def test_one_idempotency_key_through_both_replicas_at_once_makes_one_sandbox(cluster: Cluster) -> None:
    """The same Idempotency-Key sent to both replicas concurrently: both answer the one sandbox
    (the key's lock is PostgreSQL's, not a replica's)."""
    import threading
    import uuid

    from sqlalchemy import select

    from sandboxd.store.db import SandboxRow

    key = f"cl-{uuid.uuid4()}"
    answers: list[httpx.Response] = []
    gate = threading.Barrier(2)

    def create(api: Proc) -> None:
        gate.wait()
        answers.append(httpx.post(f"{api.url}/v2/sandboxes", json={"templateID": "base", "timeout": 60},
                                  headers={"X-API-Key": cluster.api_key, "Idempotency-Key": key}, timeout=120))

    threads = [threading.Thread(target=create, args=(api,)) for api in cluster.apis]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in answers] == [201, 201], [r.text for r in answers]
    ids = {r.json()["sandboxID"] for r in answers}
    with cluster.db().session() as s:
        made = list(s.scalars(select(SandboxRow.sandbox_id).where(SandboxRow.idempotency_key.like(f"%:{key}"))))
    try:
        assert len(ids) == 1 and made == list(ids), (ids, made)
    finally:
        for sandbox_id in set(made) | ids:
            Sandbox.kill(sandbox_id, **_opts(cluster, cluster.apis[0]))


def _build(cluster: Cluster, api: Proc, template: Any, name: str, logs: list[str] | None = None) -> None:
    from e2b import Template

    seen: list[str] = [] if logs is None else logs
    try:
        Template.build(template, name, on_build_logs=lambda e: seen.append(e.message), **_opts(cluster, api))
    except Exception:
        print("build logs:\n" + "\n".join(seen))
        raise


def test_template_builds_and_tags_through_either_api_replica(cluster: Cluster, tmp_path: Path) -> None:
    """``Template.build`` through replica A runs on the node placed at its request (node3 here:
    the others drained); a sandbox of it started through replica B on another node fetches the
    build, verified; tags and aliases work through both replicas; an upload URL one replica signed
    is accepted by the other."""
    import hashlib
    import io
    import tarfile
    import uuid

    from e2b import Template

    from sandboxd.store.templates_db import TemplateBuilds

    a, b = cluster.apis
    node3 = cluster.nodes[2]
    marker = uuid.uuid4().hex  # a build no store holds yet
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "data.txt").write_text(f"copied {marker}\n")
    template = (Template(file_context_path=str(tmp_path)).from_image("e2bdev/base")
                .copy("app/data.txt", "/opt/data.txt").run_cmd(f"echo built {marker} > /home/user/run.txt"))
    name = f"cl-tpl-{marker[:8]}"
    nodes = Nodes(cluster.db())
    logs: list[str] = []
    for n in cluster.nodes[:2]:
        nodes.set_state(n.name, DRAINING)
    try:
        _build(cluster, a, template, name, logs)
    finally:
        for n in cluster.nodes[:2]:
            nodes.set_state(n.name, ACTIVE)
    db = cluster.db()
    builds = TemplateBuilds(db)
    latest = builds.latest(name)
    assert latest is not None and latest.status == "ready" and latest.node_id == node3.name
    assert any("RUN echo built" in m for m in logs)  # logs streamed to the SDK through A
    content_id = builds.resolve(name)
    assert content_id is not None and Nodes(db).checksum(content_id) is not None  # recorded before ready

    for api in (a, b):  # aliases are rows: either replica answers
        assert Template.exists(name, **_opts(cluster, api)) and not Template.exists(name + "-nope", **_opts(cluster, api))
    Template.assign_tags(name, ["stable"], **_opts(cluster, b))
    assert {t.tag for t in Template.get_tags(name, **_opts(cluster, a))} == {"default", "stable"}
    Template.remove_tags(name, ["stable"], **_opts(cluster, a))
    assert {t.tag for t in Template.get_tags(name, **_opts(cluster, b))} == {"default"}

    nodes.set_state(node3.name, DRAINING)  # a sandbox elsewhere: that node must fetch the build
    try:
        sbx = Sandbox.create(name, timeout=60, **_opts(cluster, b))
        try:
            runner = _node_of(cluster, sbx.sandbox_id)
            assert runner is not node3
            assert f"build {content_id} fetched from node {node3.name}" in runner.log()
            out = sbx.commands.run("cat /opt/data.txt /home/user/run.txt").stdout
            assert out == f"copied {marker}\nbuilt {marker}\n"
        finally:
            sbx.kill()
    finally:
        nodes.set_state(node3.name, ACTIVE)

    # an upload URL signed by one replica is good at the other (the SDK's PUT may land anywhere)
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as tar:
        info = tarfile.TarInfo("x.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    files_hash = hashlib.sha256(marker.encode()).hexdigest()
    headers = {"X-API-Key": cluster.api_key}
    link = httpx.get(f"{b.url}/templates/{latest.template_id}/files/{files_hash}", headers=headers).json()
    assert link["present"] is False
    put = httpx.put(link["url"].replace(b.url, a.url), content=body.getvalue())
    assert put.status_code == 200, put.text
    again = httpx.get(f"{a.url}/templates/{latest.template_id}/files/{files_hash}", headers=headers).json()
    assert again == {"present": True}
    forged = httpx.put(link["url"].replace(b.url, a.url).replace("token=", "token=0"), content=b"x")
    assert forged.status_code == 403


def test_sandboxd_node_drain(cluster: Cluster) -> None:
    """A drained node gets no new sandboxes (its running ones run on); ``--undo`` takes it back."""
    import subprocess
    import sys

    exe = str(Path(sys.executable).with_name("sandboxd"))
    env = {**cluster.apis[0].env}
    api = cluster.apis[1]
    before = Sandbox.create(timeout=120, **_opts(cluster, api))
    drained = _node_of(cluster, before.sandbox_id)
    out = subprocess.run([exe, "node", "drain", drained.name], env=env, capture_output=True, text=True, check=True)
    assert "draining" in out.stdout
    listing = subprocess.run([exe, "node", "list"], env=env, capture_output=True, text=True, check=True).stdout
    assert drained.name in listing and "draining" in listing
    try:
        made = [Sandbox.create(timeout=60, **_opts(cluster, api)) for _ in range(3)]
        assert all(_node_of(cluster, s.sandbox_id) is not drained for s in made)
        assert before.commands.run("echo runs on").stdout == "runs on\n"
        for s in made:
            s.kill()
    finally:
        subprocess.run([exe, "node", "drain", "--undo", drained.name], env=env, capture_output=True, check=True)
        before.kill()
    row = Nodes(cluster.db()).get(drained.name)
    assert row is not None and row.state == ACTIVE


def test_node_traffic_needs_the_cluster_secret(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    res = httpx.post(node.url + "/internal/v1/sandboxes", json={"template": "base", "timeout_s": 60})
    assert res.status_code == 401 and res.json()["code"] == 401
    res = httpx.get(node.url + "/internal/v1/health", headers={"x-sandboxd-cluster-secret": "x" * 43})
    assert res.status_code == 401


def test_no_node_with_room_is_a_503_in_e2bs_shape(cluster: Cluster) -> None:
    nodes = Nodes(cluster.db())
    for n in cluster.nodes:
        nodes.set_state(n.name, DRAINING)
    try:
        res = httpx.post(cluster.apis[0].url + "/v2/sandboxes", json={"templateID": "base"},
                         headers={"X-API-Key": cluster.api_key})
        assert res.status_code == 503, res.text
        body = res.json()
        assert body["code"] == 503 and "no node has room" in body["message"]
        assert res.headers["retry-after"]
    finally:
        for n in cluster.nodes:
            nodes.set_state(n.name, ACTIVE)


def _wait_until(what: str, check: Any, within_s: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within_s:
            raise AssertionError(f"{what}: not within {within_s}s")
        time.sleep(0.25)
    return time.monotonic() - started


def test_kill_9_of_a_node(cluster: Cluster) -> None:
    """Its sandboxes are reported gone within the bound; creates go to the other nodes at once;
    restarted, it reconciles (what it still had on the host is removed)."""
    api = cluster.apis[0]
    sbx = Sandbox.create(timeout=300, **_opts(cluster, api))
    victim = _node_of(cluster, sbx.sandbox_id)
    row = cluster.db().get_sandbox(sbx.sandbox_id)
    assert row is not None
    sandbox_dir = victim.settings.sandboxes_dir / sbx.sandbox_id
    assert sandbox_dir.exists()
    snap = Sandbox.create_snapshot(sbx.sandbox_id, **_opts(cluster, api))  # held by the victim alone
    victim.kill9()
    killed_at = time.monotonic()
    others = []
    try:
        for _ in range(3):  # right away: the dead node is skipped (it does not answer)
            s = Sandbox.create(timeout=60, **_opts(cluster, api))
            others.append(s)
            assert _node_of(cluster, s.sandbox_id).name != victim.name
        took = _wait_until("the dead node's sandbox reported gone",
                           lambda: sbx.sandbox_id not in {s.sandbox_id for s in Sandbox.list(**_opts(cluster, api))
                                                          .next_items()}, GONE_WITHIN_S)
        print(f"reported gone {time.monotonic() - killed_at:.1f}s after kill -9 (waited {took:.1f}s)")
        with pytest.raises(NotFoundException):
            Sandbox.get_info(sbx.sandbox_id, **_opts(cluster, cluster.apis[1]))
        node = Nodes(cluster.db()).get(victim.name)
        assert node is not None and node.state == GONE
        # its snapshot's files went with it: a clear 503 in E2B's shape naming the node
        res = httpx.post(api.url + "/v2/sandboxes", json={"templateID": snap.snapshot_id},
                         headers={"X-API-Key": cluster.api_key})
        assert res.status_code == 503, res.text
        assert res.json()["code"] == 503 and f"held by node {victim.name}" in res.json()["message"]
        assert "not in the cluster" in res.json()["message"] and res.headers["should-retry"] == "false"
    finally:
        for s in others:
            s.kill()
    assert traces(victim.settings, sbx.sandbox_id, row.slot_index)["container"]  # left running by the crash
    victim.start()  # comes back: recovery finds no record of its sandbox and removes it
    wait_node(cluster, victim)
    assert not sandbox_dir.exists()
    assert traces(victim.settings, sbx.sandbox_id, row.slot_index) == CLEAN  # no netns, mount, process left
    node = Nodes(cluster.db()).get(victim.name)
    assert node is not None and node.state == ACTIVE
    assert Sandbox.delete_snapshot(snap.snapshot_id, **_opts(cluster, api)) is True


def test_a_build_whose_node_is_killed_fails_saying_so(cluster: Cluster) -> None:
    """kill -9 of the node running a build: the SDK's ``Template.build`` ends with a failed build
    naming the node (when the node is given up), never waits forever."""
    import threading
    import uuid

    from e2b import Template
    from e2b.exceptions import BuildException

    from sandboxd.store.templates_db import TemplateBuilds

    api = cluster.apis[1]
    marker = uuid.uuid4().hex
    name = f"cl-tpl-killed-{marker[:8]}"
    outcome: list[BaseException | None] = []

    def build() -> None:
        try:
            _build(cluster, api, Template().from_image("e2bdev/base").run_cmd(f"echo {marker}; sleep 30"), name)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    builds = TemplateBuilds(cluster.db())
    _wait_until("the build's RUN step running",
                lambda: (row := builds.latest(name)) is not None and row.status == "building"
                and any(marker in e.message for e in builds.logs(row.build_id)), 120)
    row = builds.latest(name)
    assert row is not None and row.node_id is not None
    victim = next(n for n in cluster.nodes if n.name == row.node_id)
    victim.kill9()
    killed_at = time.monotonic()
    try:
        thread.join(GONE_WITHIN_S + 15)
        print(f"build reported failed {time.monotonic() - killed_at:.1f}s after kill -9 of its node")
        assert outcome and isinstance(outcome[0], BuildException), outcome
        assert f"the node running this build, {victim.name}, left the cluster" in str(outcome[0])
        final = builds.get(row.build_id)
        assert final is not None and final.status == "error" and final.finished_at is not None
    finally:
        victim.start()
        wait_node(cluster, victim)


def test_kill_9_of_an_api_replica_loses_nothing(cluster: Cluster) -> None:
    a, b = cluster.apis
    sbx = Sandbox.create(timeout=120, **_opts(cluster, a))
    try:
        a.kill9()
        again = Sandbox.connect(sbx.sandbox_id, **_opts(cluster, b))
        assert again.commands.run("echo still here").stdout == "still here\n"
        extra = Sandbox.create(timeout=60, **_opts(cluster, b))
        extra.kill()
    finally:
        a.start()
        wait_api(a)
    assert Sandbox.connect(sbx.sandbox_id, **_opts(cluster, a)).commands.run("true").exit_code == 0
    sbx.kill()


def test_a_postgresql_restart_is_survived(cluster: Cluster) -> None:
    """Nothing is given up for the outage: every node gets a full timeout to heartbeat again, and
    the pools reconnect."""
    api = cluster.apis[1]
    sbx = Sandbox.create(timeout=300, **_opts(cluster, api))
    try:
        cluster.pg.restart()
        _wait_until("the API answering again",
                    lambda: _lists(cluster, api, sbx.sandbox_id), 30)
        time.sleep(cluster.nodes[0].settings.node_timeout_s + 3)  # past the timeout after the outage
        assert _lists(cluster, api, sbx.sandbox_id)
        assert {n.state for n in Nodes(cluster.db()).all()} == {ACTIVE}
        assert sbx.commands.run("echo ok").stdout == "ok\n"
        more = Sandbox.create(timeout=60, **_opts(cluster, cluster.apis[0]))
        more.kill()
    finally:
        sbx.kill()


def _lists(cluster: Cluster, api: Proc, sandbox_id: str) -> bool:
    try:
        return sandbox_id in {s.sandbox_id for s in Sandbox.list(**_opts(cluster, api)).next_items()}
    except SandboxException:
        return False


_WS_SERVER = r"""
import base64, hashlib, socket, threading
def ws(conn):
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096)
    lines = head.decode().split("\r\n")
    fields = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
    accept = base64.b64encode(hashlib.sha1((fields["sec-websocket-key"]
                              + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
    text = ("token=" + fields.get("e2b-traffic-access-token", "")).encode()
    conn.sendall(bytes([0x81, len(text)]) + text)
    conn.recv(1024)
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8001)); srv.listen()
while True:
    conn, _ = srv.accept()
    threading.Thread(target=ws, args=(conn,), daemon=True).start()
"""


def test_a_websocket_to_a_private_sandbox_through_an_api_replica(cluster: Cluster) -> None:
    """``allowPublicTraffic: false``: the token reaches the node (which checks it) and not the
    sandbox; without it, or with a wrong one, the handshake is refused."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    a, b = cluster.apis
    sbx = Sandbox.create(timeout=120, network={"allow_public_traffic": False}, **_opts(cluster, a))
    try:
        token = sbx.traffic_access_token
        assert token
        sbx.files.write("/tmp/ws.py", _WS_SERVER)
        sbx.commands.run("python3 /tmp/ws.py", background=True)
        naming = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8001"}
        for api in (a, b):
            url = api.url.replace("http", "ws", 1) + "/"
            deadline = time.monotonic() + 20
            while True:
                try:
                    with connect(url, additional_headers={**naming, "e2b-traffic-access-token": token},
                                 open_timeout=5) as ws:
                        assert ws.recv(timeout=5) == "token="  # checked by the node, never passed on
                    break
                except (OSError, TimeoutError, InvalidStatus):  # the server in the sandbox is starting
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.3)
            for wrong in ({}, {"e2b-traffic-access-token": "x" * len(token)}):
                with pytest.raises(InvalidStatus) as refused, \
                        connect(url, additional_headers={**naming, **wrong}, open_timeout=5):
                    pass
                assert refused.value.response.status_code == 403
    finally:
        sbx.kill()


def _snapshot_ids(cluster: Cluster, api: Proc, **query: str) -> list[str]:
    paginator = Sandbox.list_snapshots(**query, **_opts(cluster, api))
    ids: list[str] = []
    while paginator.has_next:
        ids += [s.snapshot_id for s in paginator.next_items()]
    return ids


def test_snapshots_and_forks_through_either_api_replica(cluster: Cluster) -> None:
    """A snapshot is taken on the sandbox's node and recorded with it; listed and deleted through
    either replica; sandboxes from it are placed on that node (its capture is there), forks too."""
    from sandboxd.store.snapshots_db import Snapshots

    a, b = cluster.apis
    source = Sandbox.create(envs={"FROM": "source"}, timeout=180, **_opts(cluster, a))
    made: list[Sandbox] = []
    try:
        holder = _node_of(cluster, source.sandbox_id)
        source.files.write("/home/user/state.txt", "v1")
        snap = Sandbox.create_snapshot(source.sandbox_id, **_opts(cluster, b))
        snapshot_id = snap.snapshot_id.removesuffix(":default")
        record = Snapshots(cluster.db()).find(snapshot_id)
        assert record is not None and record.node_id == holder.name
        captured = holder.settings.data_dir / "snapshots" / snapshot_id
        assert captured.is_dir()
        source.files.write("/home/user/state.txt", "v2")  # after the snapshot: not in it
        for api in (a, b):
            assert snap.snapshot_id in _snapshot_ids(cluster, api)
            assert _snapshot_ids(cluster, api, sandbox_id=source.sandbox_id) == [snap.snapshot_id]

        for api in (a, b, a):  # never by chance: three creates, each on the holder
            s = Sandbox.create(snap.snapshot_id, timeout=120, **_opts(cluster, api))
            made.append(s)
            assert _node_of(cluster, s.sandbox_id) is holder
            assert s.files.read("/home/user/state.txt") == "v1"
            assert s.commands.run("echo $FROM").stdout == "source\n"
        made[0].files.write("/home/user/state.txt", "mine")
        assert made[1].files.read("/home/user/state.txt") == "v1"

        forks = Sandbox.connect(source.sandbox_id, **_opts(cluster, b)).fork(count=2, timeout=120)
        assert all(isinstance(f, Sandbox) for f in forks), forks
        made += forks
        for f in forks:
            assert _node_of(cluster, f.sandbox_id) is holder
            again = Sandbox.connect(f.sandbox_id, **_opts(cluster, a))
            assert again.files.read("/home/user/state.txt") == "v2"
        with pytest.raises(NotFoundException):
            Sandbox.fork("nosuchsandbox", **_opts(cluster, a))

        assert Sandbox.delete_snapshot(snap.snapshot_id, **_opts(cluster, a)) is True
        assert Sandbox.delete_snapshot(snap.snapshot_id, **_opts(cluster, b)) is False
        assert not captured.exists() and Snapshots(cluster.db()).find(snapshot_id) is None
        assert snap.snapshot_id not in _snapshot_ids(cluster, b)
        with pytest.raises(SandboxException, match="not found"):
            Sandbox.create(snap.snapshot_id, timeout=60, **_opts(cluster, b))
        assert made[0].files.read("/home/user/state.txt") == "mine"  # deleting it took nothing
    finally:
        for s in (source, *made):
            s.kill()


def test_volumes_through_either_api_replica(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A volume's files are on the node that made it (its record names it); its content API works
    through either replica (forwarded to that node); sandboxes mounting it are placed there."""
    from e2b import Volume
    from e2b.exceptions import VolumeException

    from sandboxd.orchestrator.volumes import Volumes

    a, b = cluster.apis
    monkeypatch.setenv("E2B_VOLUME_API_URL", b.url)  # content calls through the other replica
    name = f"vol-{int(time.time() * 1000) % 10**9}"
    volume = Volume.create(name, **_opts(cluster, a))
    made: list[Sandbox] = []
    try:
        record = Volumes.find_record(cluster.db(), volume.volume_id)
        assert record is not None and record.node_id is not None
        holder = next(n for n in cluster.nodes if n.name == record.node_id)
        assert (holder.settings.data_dir / "volumes" / volume.volume_id / "data").is_dir()
        for api in (a, b):
            assert volume.volume_id in [v.volume_id for v in Volume.list(**_opts(cluster, api))]
            assert Volume.get_info(volume.volume_id, **_opts(cluster, api)).name == name
        volume.write_file("/seed/hello.txt", "from the API", force=True)
        for api in (a, b, a):  # never by chance: each on the holder
            s = Sandbox.create(volume_mounts={"/mnt/data": volume}, timeout=120, **_opts(cluster, api))
            made.append(s)
            assert _node_of(cluster, s.sandbox_id) is holder
            assert s.files.read("/mnt/data/seed/hello.txt") == "from the API"
        made[0].commands.run("echo from-sandbox > /mnt/data/written.txt")
        assert made[1].commands.run("cat /mnt/data/written.txt").stdout == "from-sandbox\n"  # shared
        monkeypatch.setenv("E2B_VOLUME_API_URL", a.url)
        again = Volume.connect(volume.volume_id, **_opts(cluster, a))
        assert again.read_file("/written.txt") == "from-sandbox\n"
        with pytest.raises(VolumeException, match="mounted by sandbox"):
            Volume.destroy(volume.volume_id, **_opts(cluster, b))  # in use: refused
        for s in made:
            s.kill()
        made.clear()
        assert Volume.destroy(volume.volume_id, **_opts(cluster, b)) is True
        assert Volume.destroy(volume.volume_id, **_opts(cluster, a)) is False
        assert not (holder.settings.data_dir / "volumes" / volume.volume_id).exists()
    finally:
        for s in made:
            s.kill()
        Volume.destroy(volume.volume_id, **_opts(cluster, a))


def _copies(cluster: Cluster, snapshot_id: str) -> dict[str, list[str]]:
    """Per node, its copies of the snapshot and any fetch under way or left behind."""
    out = {}
    for n in cluster.nodes:
        root = n.settings.data_dir / "snapshot-copies"
        names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        out[n.name] = [x for x in names if x.startswith((snapshot_id, ".fetch"))]
    return out


def test_a_snapshot_starts_on_another_node_when_its_holder_is_drained(cluster: Cluster) -> None:
    """Its holder drained, a sandbox from a (filesystem) snapshot starts on another node, which
    fetched the capture from the holder and checked it against the checksum recorded at capture;
    a corrupt or truncated capture is refused (nothing starts, no copy is kept); a snapshot
    without a recorded checksum stays on its node, saying why. A paused sandbox resumes on its
    drained node (its files are there), and is refused with a 503 naming it when it has no room."""
    import subprocess

    from sandboxd.store.snapshots_db import Snapshots

    a, b = cluster.apis
    nodes, records = Nodes(cluster.db()), Snapshots(cluster.db())
    source = Sandbox.create(timeout=300, **_opts(cluster, a))
    made: list[Sandbox] = []
    holder = _node_of(cluster, source.sandbox_id)
    source.files.write("/home/user/moved.txt", "from the holder")
    snap = Sandbox.create_snapshot(source.sandbox_id, **_opts(cluster, a))
    snapshot_id = snap.snapshot_id.removesuffix(":default")
    record = records.find(snapshot_id)
    assert record is not None and record.node_id == holder.name and record.checksum
    image = holder.settings.data_dir / "snapshots" / snapshot_id / "disk.img"
    keep = image.with_name(".keep-disk.img")
    nodes.set_state(holder.name, DRAINING)
    try:
        # a paused sandbox on the drained node resumes there (its files are there)
        source.pause()
        again = Sandbox.connect(source.sandbox_id, **_opts(cluster, b))
        assert _node_of(cluster, source.sandbox_id) is holder
        assert again.commands.run("cat /home/user/moved.txt").stdout == "from the holder"
        # paused with its disk alone it holds no room; if its node has none when it resumes: a
        # 503 naming the node (as if the node had filled up: the sandbox asks for more than it has)
        again.pause(mode="filesystem")
        cluster.db().update_sandbox(source.sandbox_id, cpu_count=1000)
        res = httpx.post(f"{b.url}/v2/sandboxes/{source.sandbox_id}/connect", json={"timeout": 120},
                         headers={"X-API-Key": cluster.api_key})
        assert res.status_code == 503 and res.headers["retry-after"], res.text
        assert f"paused on node {holder.name}, which is full" in res.json()["message"]
        cluster.db().update_sandbox(source.sandbox_id, cpu_count=record.cpu_count)  # (it stays paused)

        def refused(match: str, error: type[Exception] = SandboxException) -> None:
            with pytest.raises(error, match=match):
                made.append(Sandbox.create(snap.snapshot_id, timeout=60, **_opts(cluster, b)))
            assert not any(_copies(cluster, snapshot_id).values()), _copies(cluster, snapshot_id)
            assert not [r for r in cluster.db().list_sandboxes() if r.template_id == snapshot_id]

        records.put(snapshot_id=snapshot_id, checksum=None)  # as one taken before checksums were kept
        refused(f"starts only on node {holder.name}, which is draining.*before snapshots recorded a checksum",
                ServiceBusyException)
        records.put(snapshot_id=snapshot_id, checksum=record.checksum)

        with open(image, "r+b") as f:  # corrupt: 8 bytes of the image's boot block
            first = f.read(8)
            f.seek(0)
            f.write(b"corrupt!")
        refused(f"fetched from node {holder.name} was refused.*corrupt or partial")
        with open(image, "r+b") as f:
            f.write(first)

        subprocess.run(["cp", "--sparse=always", str(image), str(keep)], check=True)  # partial: cut in half
        os.truncate(image, image.stat().st_size // 2)
        refused("was refused")
        os.replace(keep, image)

        s = Sandbox.create(snap.snapshot_id, timeout=120, **_opts(cluster, b))
        made.append(s)
        other = _node_of(cluster, s.sandbox_id)
        assert other is not holder
        assert s.files.read("/home/user/moved.txt") == "from the holder"
        assert _copies(cluster, snapshot_id)[other.name] == [f"{snapshot_id}-{record.checksum}"]
    finally:
        nodes.set_state(holder.name, ACTIVE)
        if keep.exists():
            os.replace(keep, image)
    try:
        s = Sandbox.create(snap.snapshot_id, timeout=120, **_opts(cluster, a))  # the holder again, first
        made.append(s)
        assert _node_of(cluster, s.sandbox_id) is holder
        assert Sandbox.delete_snapshot(snap.snapshot_id, **_opts(cluster, a)) is True
        assert not any(_copies(cluster, snapshot_id).values())  # every node dropped its copies
        assert made[-2].files.read("/home/user/moved.txt") == "from the holder"  # its own disk stays
    finally:
        for x in (source, *made):
            x.kill()
