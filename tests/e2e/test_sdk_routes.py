"""The routes older SDKs send, checked with the SDK's own generated client (it parses a body only
for the exact success status and the keys it requires), and logs as E2B serves them."""

from __future__ import annotations

import importlib
import pkgutil
import re
import time
from pathlib import Path

import httpx
import pytest

from .conftest import Server

pytestmark = pytest.mark.slow


def _client(server: Server):
    from e2b.api.client.client import AuthenticatedClient

    return AuthenticatedClient(base_url=server.url, token=server.api_key, prefix="", auth_header_name="X-API-Key",
                               timeout=httpx.Timeout(120))


def _messages(server: Server, sandbox_id: str, **params: object) -> list[str]:
    with server.api() as api:
        r = api.get(f"/v2/sandboxes/{sandbox_id}/logs", params=params)
    assert r.status_code == 200, r.text
    return [e["message"] for e in r.json()["logs"]]


def test_v1_create_list_refresh_metrics_pause_resume_and_logs(sdk_env: Server) -> None:
    from e2b.api.client.api.sandboxes import (
        delete_sandboxes_sandbox_id,
        get_sandboxes,
        get_sandboxes_metrics,
        get_sandboxes_sandbox_id_logs,
        get_v_2_sandboxes_sandbox_id_logs,
        post_sandboxes,
        post_sandboxes_sandbox_id_pause,
        post_sandboxes_sandbox_id_refreshes,
        post_sandboxes_sandbox_id_resume,
        post_sandboxes_sandbox_id_timeout,
    )
    from e2b.api.client.models import (
        LogsDirection,
        NewSandbox,
        ResumedSandbox,
        SandboxPauseRequest,
        SandboxRefreshRequest,
        SandboxTimeoutRequest,
    )

    client = _client(sdk_env)
    created = post_sandboxes.sync_detailed(client=client, body=NewSandbox(template_id="base", timeout=60, secure=True))
    assert created.status_code == 201, created.content
    sbx = created.parsed
    sandbox_id = sbx.sandbox_id
    try:
        assert sbx.envd_access_token and sbx.envd_version
        listed = get_sandboxes.sync_detailed(client=client)
        assert listed.status_code == 200 and sandbox_id in [s.sandbox_id for s in listed.parsed]
        assert post_sandboxes_sandbox_id_refreshes.sync_detailed(
            sandbox_id, client=client, body=SandboxRefreshRequest(duration=120)).status_code == 204
        metrics = get_sandboxes_metrics.sync_detailed(client=client, sandbox_ids=[sandbox_id, "nosuchsandbox"])
        assert metrics.status_code == 200, metrics.content
        assert set(metrics.parsed.sandboxes) == {sandbox_id}
        assert metrics.parsed.sandboxes[sandbox_id]["memTotal"] > 0

        paused = post_sandboxes_sandbox_id_pause.sync_detailed(sandbox_id, client=client, body=SandboxPauseRequest())
        assert paused.status_code == 204
        # as on E2B: a paused sandbox has no timeout to set (SDK 2.0's connect resumes on this 404)
        assert post_sandboxes_sandbox_id_timeout.sync_detailed(
            sandbox_id, client=client, body=SandboxTimeoutRequest(timeout=60)).status_code == 404
        assert post_sandboxes_sandbox_id_refreshes.sync_detailed(
            sandbox_id, client=client, body=SandboxRefreshRequest()).status_code == 404
        resumed = post_sandboxes_sandbox_id_resume.sync_detailed(sandbox_id, client=client,
                                                                 body=ResumedSandbox(timeout=60))
        assert resumed.status_code == 201, resumed.content
        assert resumed.parsed.sandbox_id == sandbox_id
        again = post_sandboxes_sandbox_id_resume.sync_detailed(sandbox_id, client=client, body=ResumedSandbox())
        assert again.status_code == 409 and again.parsed.code == 409

        v1 = get_sandboxes_sandbox_id_logs.sync_detailed(sandbox_id, client=client)
        assert v1.status_code == 200, v1.content
        assert [e.message for e in v1.parsed.log_entries][:1] == ["Sandbox created from template base and started"]
        assert [e.message for e in v1.parsed.log_entries][-2:] == [
            "Sandbox paused (memory and filesystem)", "Sandbox resumed"]
        assert len(v1.parsed.logs) == len(v1.parsed.log_entries)
        later = get_sandboxes_sandbox_id_logs.sync_detailed(
            sandbox_id, client=client, start=int(v1.parsed.logs[-1].timestamp.timestamp() * 1000))
        assert [e.message for e in later.parsed.log_entries] == ["Sandbox resumed"]
    finally:
        assert delete_sandboxes_sandbox_id.sync_detailed(sandbox_id, client=client).status_code == 204

    newest = get_v_2_sandboxes_sandbox_id_logs.sync_detailed(sandbox_id, client=client,
                                                             direction=LogsDirection.BACKWARD, limit=2)
    assert newest.status_code == 200, newest.content
    assert [e.message for e in newest.parsed.logs] == ["Sandbox killed", "Sandbox resumed"]
    assert [e.level.value for e in newest.parsed.logs] == ["info", "info"]
    assert _messages(sdk_env, sandbox_id, search="paused") == ["Sandbox paused (memory and filesystem)"]
    assert _messages(sdk_env, sandbox_id, level="warn") == []


def test_v1_create_without_secure_has_no_envd_token_and_still_runs_commands(sdk_env: Server) -> None:
    """SDK 1.x sends ``secure: false`` unless told otherwise: envd then checks no token."""
    from e2b import Sandbox

    with sdk_env.api() as api:
        r = api.post("/sandboxes", json={"templateID": "base", "timeout": 60})
        assert r.status_code == 201, r.text
        assert r.json()["envdAccessToken"] is None
        sandbox_id = r.json()["sandboxID"]
    sbx = Sandbox.connect(sandbox_id)
    try:
        assert sbx.commands.run("echo open").stdout == "open\n"
        paused_and_back = sbx.pause() and Sandbox.connect(sandbox_id)
        assert paused_and_back.commands.run("echo still").stdout == "still\n"
    finally:
        sbx.kill()


def test_logs_of_unknown_sandboxes_and_bad_queries_answer_e2b_errors(sdk_env: Server) -> None:
    with sdk_env.api() as api:
        assert api.get("/sandboxes/nosuchsandbox/logs").json()["code"] == 404
        assert api.get("/v2/sandboxes/nosuchsandbox/logs").json()["code"] == 404
        bad = api.get("/v2/sandboxes/x/logs", params={"direction": "sideways"})
        assert bad.status_code == 400 and "direction" in bad.json()["message"]
        assert api.get("/sandboxes/metrics").json()["code"] == 400
        assert api.post("/sandboxes/nosuchsandbox/resume", json={}).json()["code"] == 404


def _generated_routes() -> set[tuple[str, str]]:
    """(METHOD, path with {x} placeholders) of every operation in the installed SDK's client."""
    import e2b.api.client.api as generated

    routes = set()
    for pkg in pkgutil.iter_modules(generated.__path__):
        sub = importlib.import_module(f"{generated.__name__}.{pkg.name}")
        for mod in pkgutil.iter_modules(sub.__path__):
            src = Path(importlib.import_module(f"{sub.__name__}.{mod.name}").__file__).read_text()
            method = re.search(r'"method":\s*"(\w+)"', src)
            url = re.search(r'"url":\s*f?"([^"]+)"', src)
            if method and url:
                routes.add((method.group(1).upper(), url.group(1)))
    return routes


def test_every_route_the_sdk_names_is_served_or_answers_501(sdk_env: Server) -> None:
    routes = _generated_routes()
    assert len(routes) > 40, routes  # the parsing found the client's operations
    with sdk_env.api() as api:
        for method, path in sorted(routes):
            url = re.sub(r"\{[^}]+\}", "nosuchthing", path)
            # a list is no valid body anywhere: nothing gets created
            r = api.request(method, url, json=[] if method in ("POST", "PUT", "PATCH") else None)
            body = r.json() if isinstance(r.json(), dict) else {}  # list routes answer []
            assert r.status_code != 405 and body.get("message") != "Not Found", (method, path, r.status_code, body)
            if r.status_code >= 400:
                assert set(body) >= {"code", "message"} and body["code"] == r.status_code, (method, path, body)
            if r.status_code == 501:
                assert "sandboxd does not implement" in body["message"]


def test_start_command_output_is_in_the_sandbox_logs(sdk_env: Server) -> None:
    """The template's start command (a web server here) writes to the sandbox's logs."""
    from e2b import Sandbox, Template

    name = "e2e-logs-start"
    ready = "python3 -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/')\""
    Template.build(Template().from_image("e2bdev/base").set_start_cmd(
        "echo serving on 8001; python3 -m http.server 8001", ready), name)
    with Sandbox.create(name, timeout=60) as sbx:
        deadline = time.monotonic() + 10
        messages = _messages(sdk_env, sbx.sandbox_id)
        while not any('"GET / HTTP/1.1" 200' in m for m in messages):
            assert time.monotonic() < deadline, messages
            time.sleep(0.2)
            messages = _messages(sdk_env, sbx.sandbox_id)
        assert "serving on 8001" in messages
        with sdk_env.api() as api:
            entries = api.get(f"/v2/sandboxes/{sbx.sandbox_id}/logs").json()["logs"]
        served = next(e for e in entries if '"GET / HTTP/1.1" 200' in e["message"])
        assert served["level"] == "warn" and served["fields"] == {"logger": "start_cmd", "stream": "stderr"}
