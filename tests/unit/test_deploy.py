"""The deployment files in deploy/ (systemd, Kubernetes, Nomad), checked offline: every command
they run is one ``sandboxd`` accepts, every ``SANDBOXD_*`` variable is a setting, every secret
file they name is mounted or shipped; ``systemd-analyze verify`` and ``kubectl kustomize`` where
those tools are installed."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import pytest
import yaml

from sandboxd.cli import main
from sandboxd.config import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SETTINGS = {f"SANDBOXD_{f.name.upper()}" for f in dataclasses.fields(Settings)}
#: variables the files use for themselves (expanded in a command line), not read by sandboxd
OWN_VARIABLES = {"SANDBOXD_NODE_LISTEN"}


def _accepts(argv: list[str]) -> None:
    """``sandboxd <argv>`` parses (an unknown command or option raises)."""
    assert argv and argv[0] in main.commands, f"no sandboxd command {argv[:1]}"
    cmd = main.commands[argv[0]]
    with cmd.make_context(argv[0], list(argv[1:])) as ctx:
        assert isinstance(ctx, click.Context)


def _sandboxd_argv(words: list[str]) -> list[str]:
    i = next(i for i, w in enumerate(words) if w.endswith("sandboxd"))
    return [re.sub(r"\$\{?\w+\}?|\"", "x", w) if "$" in w else w for w in words[i + 1:]]


def test_systemd_units() -> None:
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert {u.name for u in units} == {"sandboxd.service", "sandboxd-api.service", "sandboxd-node.service"}
    env_names = {line.split("=", 1)[0] for line in (DEPLOY / "systemd" / "cluster.env.example").read_text().splitlines()
                 if line and not line.startswith("#")}
    assert env_names - OWN_VARIABLES <= SETTINGS
    for unit in units:
        text = unit.read_text()
        exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
        argv = _sandboxd_argv(shlex.split(exec_start.removeprefix("ExecStart=")))
        _accepts(argv)
        assert argv[0] == {"sandboxd.service": "serve", "sandboxd-api.service": "api",
                           "sandboxd-node.service": "node"}[unit.name]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    """As installed: the venv's sandboxd for /opt/sandboxd's, the example environment file."""
    exe = shutil.which("sandboxd") or str(Path(__import__("sys").executable).with_name("sandboxd"))
    for unit in (DEPLOY / "systemd").glob("*.service"):
        text = unit.read_text().replace("/opt/sandboxd/.venv/bin/sandboxd", exe)
        text = text.replace("/etc/sandboxd/cluster.env", str(DEPLOY / "systemd" / "cluster.env.example"))
        (tmp_path / unit.name).write_text(text)
        res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit.name)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


def _k8s_docs() -> list[dict[str, object]]:
    docs = []
    for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def test_kubernetes_manifests() -> None:
    docs = _k8s_docs()
    kinds = sorted(str(d["kind"]) for d in docs)
    assert kinds == ["DaemonSet", "Deployment", "Kustomization", "Namespace", "Secret", "Service", "Service",
                     "StatefulSet"]
    secret = next(d for d in docs if d["kind"] == "Secret")
    secret_keys = set(secret["stringData"])  # type: ignore[index]
    workloads = {d["kind"]: d for d in docs if d["kind"] in ("Deployment", "DaemonSet")}
    for kind, want in (("Deployment", "api"), ("DaemonSet", "node")):
        spec = workloads[kind]["spec"]["template"]["spec"]  # type: ignore[index]
        (container,) = spec["containers"]
        command = container["command"]
        words = shlex.split(command[-1]) if command[0] == "sh" else command
        argv = _sandboxd_argv(words)
        assert argv[0] == want
        _accepts(argv)
        env = {e["name"]: e for e in container["env"]}
        assert {n for n in env if n.startswith("SANDBOXD_")} <= SETTINGS
        assert env["SANDBOXD_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] in secret_keys
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for var in ("SANDBOXD_CLUSTER_SECRET_FILE", "SANDBOXD_SECRETS_KEY_FILE"):
            if var in env:  # a file from the mounted secret
                path = Path(env[var]["value"])
                vol = next(n for n, p in mounts.items() if path.parent == Path(p))
                assert volumes[vol]["secret"]["secretName"] == secret["metadata"]["name"]  # type: ignore[index]
                assert path.name in secret_keys
    node_spec = workloads["DaemonSet"]["spec"]["template"]["spec"]  # type: ignore[index]
    assert node_spec["hostNetwork"] is True and node_spec["containers"][0]["securityContext"]["privileged"] is True


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_manifests() -> None:
    res = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "kubernetes")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert {d["kind"] for d in yaml.safe_load_all(res.stdout) if d} == {"Namespace", "Service", "StatefulSet",
                                                                         "Deployment", "DaemonSet"}


def test_nomad_jobs() -> None:
    """One job per file; each task's command and args a sandboxd command line, its env settings."""
    files = sorted((DEPLOY / "nomad").glob("*.nomad.hcl"))
    assert [f.name for f in files] == ["sandboxd-api.nomad.hcl", "sandboxd-node.nomad.hcl"]
    for f in files:
        text = f.read_text()
        assert len(re.findall(r'^job "', text, re.M)) == 1
        assert text.count("{") == text.count("}")
        command = re.search(r'command\s*=\s*"([^"]+)"', text)
        args = re.search(r"args\s*=\s*\[([^\]]*)\]", text)
        assert command and args and command[1].endswith("/sandboxd")
        argv = [re.sub(r"\$\{[^}]+\}", "x", a) for a in re.findall(r'"([^"]*)"', args[1])]
        _accepts(argv)
        assert set(re.findall(r"^\s*(SANDBOXD_\w+)\s*=", text, re.M)) <= SETTINGS
