"""The JS SDK (``e2b`` 2.51.0) and E2B's CLI (``@e2b/cli`` 2.19.0), both from npm, against one
plain-HTTP server through ``E2B_API_URL``/``E2B_SANDBOX_URL`` (the README's way), unchanged.

The JS scenario (``scenarios/js_features.mjs``) covers what the release matrix does not; the CLI
is driven as a user would: templates (create from a Dockerfile, list) and sandboxes (list, info,
exec, metrics, logs, pause, resume, a terminal over the PTY under a real pseudo-terminal, kill).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.testing.sdk_envs import node_env, path_with_node
from sandboxd.testing.server import Server, running_server

pytestmark = pytest.mark.slow

JS_SDK_VERSION = "2.51.0"
CLI_VERSION = "2.19.0"
SCENARIO = Path(__file__).parent / "scenarios" / "js_features.mjs"
JS_TEMPLATE = "js-built"
CLI_TEMPLATE = "cli-built"


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("js") / "server.log"
    try:
        with running_server(data_dir, log_path) as srv:
            yield srv
    finally:
        if log_path.exists():
            print(f"--- server log tail ---\n{log_path.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def env(server: Server, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What a user exports: the key and both URLs (and a HOME of its own: no CLI login config;
    a node >= 20.18 first on PATH)."""
    return {"PATH": path_with_node(data_dir / "sdk-envs"), "HOME": str(tmp_path_factory.mktemp("home")),
            "E2B_API_KEY": server.api_key, "E2B_API_URL": server.url, "E2B_SANDBOX_URL": server.url}


@pytest.fixture(scope="module")
def cli(data_dir: Path) -> Path:
    return node_env(data_dir / "sdk-envs", "@e2b/cli", CLI_VERSION) / "node_modules" / ".bin" / "e2b"


def run_cli(cli: Path, env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(cli), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"e2b {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"
    return p


def _json(out: str) -> object:
    return json.loads(out[out.index(next(c for c in out if c in "[{")):])


def _ids(out: str) -> set[str]:
    """Sandbox ids in ``sandbox list --format json`` (the SDK's SandboxInfo: ``sandboxId``)."""
    if "[" not in out and "{" not in out:
        return set()
    listed = _json(out)
    return {s.get("sandboxId") or s.get("sandboxID") for s in listed}  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def js_scenario(data_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    root = node_env(data_dir / "sdk-envs", "e2b", JS_SDK_VERSION)
    script = root / f".{SCENARIO.name}.{os.getpid()}"
    shutil.copyfile(SCENARIO, script.with_suffix(".tmp"))
    os.replace(script.with_suffix(".tmp"), script.with_suffix(".mjs"))
    try:
        return subprocess.run(["node", str(script.with_suffix(".mjs")), JS_TEMPLATE], env=env, capture_output=True,
                              text=True, timeout=900)
    finally:
        script.with_suffix(".mjs").unlink(missing_ok=True)


def test_js_sdk_scenario(js_scenario: subprocess.CompletedProcess[str]) -> None:
    out = js_scenario.stdout + js_scenario.stderr
    assert js_scenario.returncode == 0, out[-6000:]
    assert js_scenario.stdout.rstrip().endswith("] ok"), out[-3000:]


def test_cli_creates_and_lists_templates(cli: Path, env: dict[str, str], tmp_path: Path,
                                         js_scenario: subprocess.CompletedProcess[str]) -> None:
    (tmp_path / "Dockerfile").write_text("FROM e2bdev/base\nRUN echo built-by-cli > /home/user/cli.txt\n")
    created = run_cli(cli, env, "template", "create", CLI_TEMPLATE, "-p", str(tmp_path), "--cpu-count", "1",
                      "--memory-mb", "512", timeout=600)
    assert "Building sandbox template" in created.stdout
    listed = _json(run_cli(cli, env, "template", "list", "--format", "json").stdout)
    assert isinstance(listed, list)
    by_name = {t["aliases"][0]: t for t in listed}
    assert {"base", CLI_TEMPLATE} <= set(by_name), by_name.keys()
    assert by_name[CLI_TEMPLATE]["cpuCount"] == 1 and by_name[CLI_TEMPLATE]["memoryMB"] == 512
    assert by_name[CLI_TEMPLATE]["buildStatus"] == "ready"
    if js_scenario.returncode == 0:
        assert by_name[JS_TEMPLATE]["cpuCount"] == 1
    pretty = run_cli(cli, env, "template", "list").stdout
    assert CLI_TEMPLATE in pretty and "Private" in pretty


def test_cli_drives_a_sandbox(cli: Path, env: dict[str, str], server: Server) -> None:
    with server.api() as api:
        created = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 300, "metadata": {"by": "cli-test"}})
        assert created.status_code == 201, created.text
    sandbox_id = created.json()["sandboxID"]
    try:
        assert sandbox_id in _ids(run_cli(cli, env, "sandbox", "list", "--format", "json").stdout)
        info = _json(run_cli(cli, env, "sandbox", "info", sandbox_id, "--format", "json").stdout)
        assert sandbox_id in json.dumps(info) and info["metadata"] == {"by": "cli-test"}, info  # type: ignore[index]
        ran = run_cli(cli, env, "sandbox", "exec", sandbox_id, "sh", "-c", "echo exec-$((6*7)); whoami")
        assert "exec-42" in ran.stdout and "user" in ran.stdout
        metrics = run_cli(cli, env, "sandbox", "metrics", sandbox_id, "--format", "json")
        assert "memTotal" in metrics.stdout or "memUsed" in metrics.stdout, metrics.stdout

        # a terminal into the sandbox over the PTY API, from a real pseudo-terminal
        term = subprocess.run(["script", "-qec", f"{cli} sandbox connect {sandbox_id}", "/dev/null"],
                              input="echo term-$((6*7)) > /home/user/term.txt; exit\n", env={**env, "TERM": "xterm"},
                              capture_output=True, text=True, timeout=120)
        assert term.returncode == 0, term.stdout + term.stderr
        ran = run_cli(cli, env, "sandbox", "exec", sandbox_id, "cat", "/home/user/term.txt")
        assert "term-42" in ran.stdout, term.stdout

        run_cli(cli, env, "sandbox", "pause", sandbox_id)
        assert sandbox_id in _ids(run_cli(cli, env, "sandbox", "list", "--state", "paused", "--format", "json").stdout)
        run_cli(cli, env, "sandbox", "resume", sandbox_id)
        assert "term-42" in run_cli(cli, env, "sandbox", "exec", sandbox_id, "cat", "/home/user/term.txt").stdout

        logs = run_cli(cli, env, "sandbox", "logs", sandbox_id).stdout
        assert "Sandbox paused" in logs and "Sandbox resumed" in logs, logs
    finally:
        run_cli(cli, env, "sandbox", "kill", sandbox_id)
    assert sandbox_id not in _ids(run_cli(cli, env, "sandbox", "list", "--format", "json").stdout)
