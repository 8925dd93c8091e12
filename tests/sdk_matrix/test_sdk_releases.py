"""Every SDK release people run, against one sandboxd in domain mode (TLS, wildcard names).

Each release runs the same scenario (``scenarios/``) in its own venv or npm dir, installed once
from PyPI / npm and cached by version under the test data dir. The clients run in a network
namespace of their own that resolves ``*.<DOMAIN>`` to the server (``sandboxd.testing.client_netns``)
and trust the CA the server made, exactly as the server's start-up text tells users to: so the
releases that only know ``https://api.<domain>`` and ``https://<port>-<id>.<domain>`` (Python 1.x
and 2.0, JS 2.0) are covered, and the newer ones run the same way E2B users run them.

A release is one entry of ``RELEASES``; a scenario is one script. The scenarios of the releases
selected for this run go at once, a few at a time, when the first test asks for its result.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandboxd.interpreter.template import NAME
from sandboxd.testing.client_netns import ClientNetns, client_netns
from sandboxd.testing.sdk_envs import node_env, path_with_node, python_env
from sandboxd.testing.server import Server, running_server

pytestmark = [pytest.mark.slow, pytest.mark.sdk_matrix]

DOMAIN = "sandboxd-matrix.test"  # .test is reserved: it can never be a real name
SCENARIOS = Path(__file__).parent / "scenarios"
PARALLEL = 3  # scenarios at once: each holds one or two sandboxes; the host has 2 cores
SCENARIO_TIMEOUT_S = 600


@dataclass(frozen=True)
class Release:
    language: str  # "python" or "js"
    package: str
    version: str
    scenario: str
    #: "domain": only E2B_DOMAIN (every release can); "urls": E2B_API_URL + E2B_SANDBOX_URL at the
    #: API's name, the sandbox chosen by headers (releases from 2.1 on; README's plain-HTTP way)
    mode: str = "domain"
    #: other packages pinned beside it: an old release with the ``e2b`` of its time, as its users have it
    pins: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.language}-{self.package}-{self.version}" + ("-urls" if self.mode == "urls" else "")


RELEASES = (
    Release("python", "e2b", "1.11.1", "python_sdk.py"),  # the last 1.x: domain mode only
    Release("python", "e2b", "2.0.2", "python_sdk.py"),  # domain mode only; v1 create, resume
    Release("python", "e2b", "2.20.3", "python_sdk.py"),  # v1 create, v1 connect
    Release("python", "e2b", "2.45.1", "python_sdk.py"),  # v1 create, v1 connect
    Release("python", "e2b", "2.20.3", "python_sdk.py", mode="urls"),  # sandbox headers on connect too
    Release("python", "e2b", "2.45.1", "python_sdk.py", mode="urls"),  # issue 18's report: 405 on create
    Release("python", "e2b", "2.63.0", "python_sdk.py"),  # v2 create, v2 connect
    Release("js", "e2b", "2.0.3", "js_sdk.mjs"),  # domain mode only; v1 create, resume
    Release("js", "e2b", "2.45.0", "js_sdk.mjs"),  # v1 create, v1 connect
    Release("js", "e2b", "2.45.0", "js_sdk.mjs", mode="urls"),
    Release("js", "e2b", "2.51.0", "js_sdk.mjs"),  # the newest on npm: v2 create, v2 connect
    # code-interpreter-v1 and its server on port 49999 (built by the server in the background)
    # the first 2.x, with the e2b of its time (the newest e2b lacks the Sandbox._transport it reads)
    Release("python", "e2b-code-interpreter", "2.0.0", "python_code_interpreter.py", pins=("e2b==2.0.2",)),
    Release("python", "e2b-code-interpreter", "2.11.5", "python_code_interpreter.py"),  # the newest
)


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str  # the scenario's steps
    stderr: str  # tracebacks, and whatever the SDK itself prints

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _prepare(release: Release, cache: Path) -> list[str]:
    """The command that runs this release's scenario (its environment installed if missing)."""
    if release.language == "python":
        python = python_env(cache, f"{release.package}=={release.version}", *release.pins)
        return [str(python), str(SCENARIOS / release.scenario)]
    root = node_env(cache, release.package, release.version)
    script = root / release.scenario  # next to node_modules, so `import 'e2b'` finds this release
    tmp = script.with_name(f".{script.name}.{os.getpid()}.{threading.get_ident()}")
    shutil.copyfile(SCENARIOS / release.scenario, tmp)
    os.replace(tmp, script)  # atomically: two modes of one release may run it at once
    return ["node", str(script)]


def _run(ns: ClientNetns, server: Server, release: Release, argv: list[str], path: str) -> Outcome:
    assert server.ca_file is not None
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/root"),
           "E2B_API_KEY": server.api_key, "E2B_DOMAIN": DOMAIN,
           "SSL_CERT_FILE": str(server.ca_file), "NODE_EXTRA_CA_CERTS": str(server.ca_file)}
    if release.mode == "urls":
        env["E2B_API_URL"] = env["E2B_SANDBOX_URL"] = f"https://api.{DOMAIN}"
    try:
        p = subprocess.run(ns.command(argv), env=env, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        return Outcome(-1, str(exc.stdout or ""), f"timed out after {SCENARIO_TIMEOUT_S}s\n{exc.stderr or ''}")
    return Outcome(p.returncode, p.stdout, p.stderr)


@pytest.fixture(scope="session")
def matrix_server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClientNetns, Server]]:
    log_path = tmp_path_factory.mktemp("matrix-server") / "server.log"
    try:
        with client_netns(DOMAIN) as ns, running_server(data_dir, log_path, host=ns.server_address, port=443,
                                                          domain=DOMAIN, builtin_templates=NAME) as server:
            yield ns, server
    finally:
        if log_path.exists():
            print(f"--- matrix server log tail ---\n{log_path.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="session")
def outcomes(request: pytest.FixtureRequest, data_dir: Path,
             matrix_server: tuple[ClientNetns, Server]) -> dict[str, Outcome]:
    """Run the scenario of every release selected in this session, PARALLEL at a time."""
    selected = {item.callspec.params["release"].id: item.callspec.params["release"]
                for item in request.session.items
                if hasattr(item, "callspec") and "release" in item.callspec.params}
    ns, server = matrix_server
    cache = data_dir / "sdk-envs"
    with ThreadPoolExecutor(PARALLEL) as pool:
        commands = dict(zip(selected, pool.map(lambda r: _prepare(r, cache), selected.values()), strict=True))
        path = path_with_node(cache)  # a node >= 20.18 first (Debian 12's is 18)
        runs = pool.map(lambda rid: _run(ns, server, selected[rid], commands[rid], path), commands)
        return dict(zip(commands, runs, strict=True))


@pytest.mark.parametrize("release", RELEASES, ids=lambda r: r.id)
def test_release_runs_the_scenario(release: Release, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[release.id]
    print(outcome.output)
    assert outcome.returncode == 0, f"{release.id} failed its scenario:\n{outcome.output[-6000:]}"
    assert outcome.stdout.rstrip().endswith("] ok"), outcome.output[-2000:]


CLI_VERSION = "2.19.0"


def test_the_cli_reads_a_sandbox_s_logs(data_dir: Path, matrix_server: tuple[ClientNetns, Server]) -> None:
    """``e2b sandbox logs`` (E2B's CLI from npm) parses the v1 logs route: each line a JSON record."""
    import json

    ns, server = matrix_server
    cli = node_env(data_dir / "sdk-envs", "@e2b/cli", CLI_VERSION) / "node_modules" / ".bin" / "e2b"
    with server.api() as api:
        created = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 60})
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["sandboxID"]
        assert created.json()["domain"] == DOMAIN  # so SDKs build https://<port>-<id>.<domain>
        assert api.delete(f"/sandboxes/{sandbox_id}").status_code == 204
    assert server.ca_file is not None
    env = {"PATH": path_with_node(data_dir / "sdk-envs"), "HOME": os.environ.get("HOME", "/root"),
           "E2B_API_KEY": server.api_key, "E2B_DOMAIN": DOMAIN, "NODE_EXTRA_CA_CERTS": str(server.ca_file)}
    p = subprocess.run(ns.command([str(cli), "sandbox", "logs", sandbox_id, "--format", "json"]), env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    records = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [(r["level"], r["message"]) for r in records] == [
        ("info", "Sandbox created from template base and started"), ("info", "Sandbox killed")], p.stdout
