"""Templates built through the real SDK's ``Template.build`` and through ``sandboxd template build``,
then started with ``Sandbox.create`` against the real server (gVisor sandboxes)."""

from __future__ import annotations

import secrets
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from sandboxd.cli import main
from sandboxd.store.db import Database
from sandboxd.store.templates_db import TemplateBuilds

from .conftest import Server

pytestmark = pytest.mark.slow

DOCKERFILE = """\
FROM e2bdev/base
ENV GREETING="hello from the template"
RUN mkdir -p /opt/app && echo "built by $(whoami): $GREETING" > /opt/app/built.txt
COPY app/ /opt/app/
WORKDIR /opt/app
USER user
RUN echo "$(whoami) in $(pwd)" > /home/user/run.txt
"""


def _context(root: Path, data: str) -> Path:
    (root / "app").mkdir(parents=True, exist_ok=True)
    (root / "Dockerfile").write_text(DOCKERFILE)
    (root / "app" / "data.txt").write_text(data)
    (root / "app" / "tool.sh").write_text("#!/bin/sh\necho tool says hi\n")
    (root / "app" / "tool.sh").chmod(0o755)
    return root


def _content_id(server: Server, name: str) -> str:
    row = Database(server.settings.db_url).find_template(name)
    assert row is not None
    return row.build_id


def _sdk_build(ctx: Path, name: str) -> list[str]:
    from e2b import Template

    logs: list[str] = []
    Template.build(Template(file_context_path=str(ctx)).from_dockerfile(str(ctx / "Dockerfile")), name,
                   on_build_logs=lambda entry: logs.append(entry.message))
    return logs


def test_template_build_then_a_sandbox_sees_every_step(sdk_env: Server, tmp_path: Path):
    from e2b import Sandbox, Template

    name = "e2e-tpl-steps"
    data = "data for the sandbox\n"
    logs = _sdk_build(_context(tmp_path / "ctx", data), name)
    assert any(m.startswith("[4/8] RUN mkdir -p /opt/app") for m in logs)  # logs stream to the SDK
    assert Template.exists(name) and not Template.exists(f"{name}-nope")
    with Sandbox.create(name, timeout=60) as sbx:
        assert sbx.files.read("/opt/app/data.txt") == data  # COPY
        out = sbx.commands.run("cat /opt/app/built.txt /home/user/run.txt; /opt/app/tool.sh").stdout
    assert out == "built by root: hello from the template\nuser in /opt/app\ntool says hi\n"  # ENV, RUN, WORKDIR, USER


def test_the_cli_and_the_sdk_make_the_same_build(sdk_env: Server, tmp_path: Path):
    ctx = _context(tmp_path / "ctx", "same context for both\n")
    res = CliRunner().invoke(main, ["template", "build", "-n", "e2e-tpl-cli", "--data-dir",
                                    str(sdk_env.settings.data_dir), str(ctx)])
    assert res.exit_code == 0, res.stderr
    _sdk_build(ctx, "e2e-tpl-sdk")
    assert res.stdout.strip() == _content_id(sdk_env, "e2e-tpl-cli") == _content_id(sdk_env, "e2e-tpl-sdk")


def test_a_changed_copy_source_is_a_new_build_and_sandboxes_see_the_new_bytes(sdk_env: Server, tmp_path: Path):
    from e2b import Sandbox

    name = "e2e-tpl-rebuild"
    ctx = _context(tmp_path / "ctx", "old bytes\n")
    _sdk_build(ctx, name)
    old_id = _content_id(sdk_env, name)
    new = f"new bytes {secrets.token_hex(8)}\n"  # unique: the shared files cache cannot already hold it
    (ctx / "app" / "data.txt").write_text(new)
    logs = _sdk_build(ctx, name)
    assert any("Uploaded 'app/'" in m for m in logs)  # the changed context was sent again
    assert _content_id(sdk_env, name) != old_id
    with Sandbox.create(name, timeout=60) as sbx:
        assert sbx.files.read("/opt/app/data.txt") == new


def test_a_failed_step_fails_the_sdk_build_with_its_output(sdk_env: Server, tmp_path: Path):
    from e2b import Template
    from e2b.exceptions import BuildException

    marker = uuid.uuid4().hex
    template = Template().from_image("e2bdev/base").run_cmd(f"echo {marker}; exit 7")
    with pytest.raises(BuildException) as failed:
        Template.build(template, "e2e-tpl-fail")
    assert "step 1" in str(failed.value) and "exit code 7" in str(failed.value) and marker in str(failed.value)


def test_tags_name_builds(sdk_env: Server, tmp_path: Path):
    from e2b import Sandbox, Template

    name = "e2e-tpl-tags"
    Template.build(Template().from_image("e2bdev/base").run_cmd("echo v1 > /tmp/v"), f"{name}:v1")
    Template.assign_tags(f"{name}:v1", ["stable", "default"])
    assert {t.tag for t in Template.get_tags(name)} == {"v1", "stable", "default"}
    Template.remove_tags(name, ["stable"])
    assert {t.tag for t in Template.get_tags(name)} == {"v1", "default"}
    with Sandbox.create(name, timeout=60) as sbx:
        assert sbx.files.read("/tmp/v") == "v1\n"
    assert TemplateBuilds(Database(sdk_env.settings.db_url)).resolve(f"{name}:v1") == _content_id(sdk_env, name)


def test_template_env_user_and_workdir_reach_sandboxes(sdk_env: Server, tmp_path: Path):
    from e2b import Sandbox

    name = "e2e-tpl-runtime"
    _sdk_build(_context(tmp_path / "ctx", "runtime\n"), name)
    with Sandbox.create(name, timeout=60) as sbx:
        out = sbx.commands.run('echo "$GREETING|$(pwd)|$(whoami)"').stdout
    assert out == "hello from the template|/opt/app|user\n"


def test_start_command_runs_and_ready_command_gates_create(sdk_env: Server):
    """The sandbox is handed out only once the ready command passes: the server is up at once."""
    from e2b import Sandbox, Template

    name = "e2e-tpl-start"
    ready = "python3 -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/marker')\""
    tpl = (Template().from_image("e2bdev/base").run_cmd("mkdir -p /home/user/www && echo up > /home/user/www/marker")
           .set_start_cmd("cd /home/user/www && python3 -m http.server 8000", ready))
    Template.build(tpl, name)
    with Sandbox.create(name, timeout=60) as sbx:
        r = sbx.commands.run("python3 -c \"import urllib.request; print(urllib.request.urlopen("
                             "'http://127.0.0.1:8000/marker').read().decode(), end='')\"")
        assert r.stdout == "up\n"


def test_template_api_answers_errors_in_e2b_shape(sdk_env: Server):
    with sdk_env.api() as api:
        assert api.post("/v3/templates", json={"name": "bad name!"}).json()["code"] == 400
        created = api.post("/v3/templates", json={"name": "e2e-tpl-api"})
        assert created.status_code == 202
        body = created.json()
        assert set(body) == {"templateID", "buildID", "public", "names", "tags", "aliases"}
        tid, bid = body["templateID"], body["buildID"]
        assert api.get(f"/templates/{tid}/builds/nope/status").json() == {
            "code": 404, "message": f"build 'nope' of template '{tid}' not found"}
        bad = api.post(f"/v2/templates/{tid}/builds/{bid}", json={"steps": [{"type": "ADD", "args": ["a", "b"]}]})
        assert bad.status_code == 400 and "unsupported step type" in bad.json()["message"]
        link = api.get(f"/templates/{tid}/files/{'c' * 64}")
        assert link.status_code == 201 and link.json()["present"] is False
        forged = link.json()["url"].split("?token=")[0] + "?token=forged"
        assert api.put(forged, content=b"x").status_code == 403
        assert api.post(f"/v2/templates/{tid}/builds/{bid}", json={"steps": []}).status_code == 202
        assert api.post(f"/v2/templates/{tid}/builds/{bid}", json={"steps": []}).status_code == 409
        deadline = time.monotonic() + 60
        while (status := api.get(f"/templates/{tid}/builds/{bid}/status").json())["status"] in ("waiting", "building"):
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert status["status"] == "ready", status
