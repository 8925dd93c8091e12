"""Volumes through the real SDK (sync and async) on gVisor: ``Volume.create/list/get_info/connect/
destroy``, the volume content API, and ``volume_mounts`` at create — a volume outlives sandboxes,
two sandboxes share one, a destroyed volume's files are gone; bad input is a clear error."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import pytest
from e2b import AsyncSandbox, AsyncVolume, Sandbox, Volume
from e2b.exceptions import (
    SandboxException,
    VolumeException,
    VolumeNotFoundException,
    VolumePathNotFoundException,
)

from .conftest import Server

pytestmark = pytest.mark.slow


@pytest.fixture
def volume_env(sdk_env: Server) -> Iterator[Server]:
    """The SDK sends content calls to E2B_VOLUME_API_URL (else https://api.<domain>)."""
    os.environ["E2B_VOLUME_API_URL"] = sdk_env.url
    try:
        yield sdk_env
    finally:
        os.environ.pop("E2B_VOLUME_API_URL", None)


ANY_ERROR = (VolumeException, SandboxException)


def _name() -> str:
    return f"vol-{uuid.uuid4().hex[:10]}"


def test_volume_outlives_sandboxes_and_is_shared(volume_env: Server) -> None:
    volume = Volume.create(_name())
    sandboxes: list[Sandbox] = []
    try:
        assert volume.volume_id in [v.volume_id for v in Volume.list()]
        assert Volume.get_info(volume.volume_id).name == volume.name
        volume.write_file("/seed/hello.txt", "from the API", force=True)

        first = Sandbox.create(volume_mounts={"/mnt/data": volume}, timeout=120)
        sandboxes.append(first)
        assert first.files.read("/mnt/data/seed/hello.txt") == "from the API"
        first.commands.run("echo from-sandbox > /mnt/data/written.txt")
        second = Sandbox.create(volume_mounts={"/data": volume.name}, timeout=120)
        sandboxes.append(second)
        assert second.commands.run("cat /data/written.txt").stdout == "from-sandbox\n"  # shared
        first.kill()
        sandboxes.remove(first)

        again = Volume.connect(volume.volume_id)
        assert again.read_file("/written.txt") == "from-sandbox\n"  # outlives the sandbox
        assert {e.name for e in again.list("/")} == {"seed", "written.txt"}
        assert [e.path for e in again.list("/", depth=2) if e.name == "hello.txt"] == ["/seed/hello.txt"]
        info = again.get_info("/seed/hello.txt")
        assert info.size == len("from the API") and info.uid == 9090
        again.update_metadata("/seed/hello.txt", mode=0o600)
        assert again.get_info("/seed/hello.txt").mode == 0o600
        assert again.exists("/seed") and not again.exists("/nope")
        again.make_dir("/a/b", force=True)
        again.remove("/a")
        assert not again.exists("/a")

        with pytest.raises(VolumeException, match="mounted by sandbox"):
            Volume.destroy(volume.volume_id)  # in use: refused, nothing lost
        assert second.commands.run("cat /data/written.txt").stdout == "from-sandbox\n"
        second.kill()
        sandboxes.remove(second)
        assert Volume.destroy(volume.volume_id) is True
        assert Volume.destroy(volume.volume_id) is False
        assert volume.volume_id not in [v.volume_id for v in Volume.list()]
        with pytest.raises(VolumeNotFoundException):
            Volume.connect(volume.volume_id)
    finally:
        for s in sandboxes:
            s.kill()
        Volume.destroy(volume.volume_id)


def test_volume_bad_input(volume_env: Server) -> None:
    volume = Volume.create(_name())
    try:
        with pytest.raises(VolumeException, match="already exists"):
            Volume.create(volume.name)
        with pytest.raises(VolumeException, match="name"):
            Volume.create("not a name!")
        with pytest.raises(ANY_ERROR, match="escapes the volume's root"):
            volume.read_file("/../../etc/passwd")
        with pytest.raises(VolumePathNotFoundException):
            volume.read_file("/missing.txt")
        with pytest.raises(VolumePathNotFoundException):
            volume.write_file("/deep/x.txt", "no parents without force")
        volume.write_file("/x.txt", "1")
        with pytest.raises(ANY_ERROR, match="already exists"):
            volume.write_file("/x.txt", "2")  # without force: never overwrites
        volume.write_file("/x.txt", "2", force=True)
        assert volume.read_file("/x.txt") == "2"

        with pytest.raises(SandboxException, match=r"404: volumeMounts\[0\].name: volume .no-such-volume. not found"):
            Sandbox.create(volume_mounts={"/mnt/v": "no-such-volume"}, timeout=60)
        with pytest.raises(SandboxException, match="system directory"):
            Sandbox.create(volume_mounts={"/etc": volume}, timeout=60)
        with pytest.raises(SandboxException, match="absolute"):
            Sandbox.create(volume_mounts={"relative/path": volume}, timeout=60)

        # a symlink a sandbox leaves in the volume never leads the content API out of it
        sbx = Sandbox.create(volume_mounts={"/mnt/v": volume}, timeout=60)
        try:
            sbx.commands.run("ln -s /etc /mnt/v/escape && ln -s / /mnt/v/root")
        finally:
            sbx.kill()
        with pytest.raises(ANY_ERROR, match="outside the volume's root"):
            volume.read_file("/escape/passwd")
        with pytest.raises(ANY_ERROR, match="symlink"):
            volume.read_file("/root")
        assert volume.get_info("/escape").type.value == "symlink"
        with volume_env.api() as api:
            r = api.get(f"/volumecontent/{volume.volume_id}/file", params={"path": "/x.txt"},
                        headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.json()["code"] == 401
    finally:
        Volume.destroy(volume.volume_id)


def test_async_volume(volume_env: Server) -> None:
    async def main() -> str:
        volume = await AsyncVolume.create(_name())
        try:
            await volume.write_file("/note.txt", "async", force=True)
            sbx = await AsyncSandbox.create(volume_mounts={"/mnt/n": volume}, timeout=60)
            try:
                return (await sbx.commands.run("cat /mnt/n/note.txt")).stdout
            finally:
                await sbx.kill()
        finally:
            await AsyncVolume.destroy(volume.volume_id)

    assert asyncio.run(main()) == "async"
