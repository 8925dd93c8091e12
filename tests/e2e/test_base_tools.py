"""``base`` has what E2B users expect: python3 with pip and venv, node and npm, git, curl, so the
SDK's template helpers (``pip_install``, ``npm_install``, ``git_clone``) build from it and
``sandbox.git`` works in it (clone, commit, push to a git daemon run inside the sandbox)."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import Server

pytestmark = pytest.mark.slow


def test_base_has_python_pip_venv_node_npm_git_and_curl(sandbox: Any) -> None:
    r = sandbox.commands.run("python3 -m venv /tmp/v && /tmp/v/bin/pip --version && node --version && "
                             "npm --version && git --version && curl --version | head -1")
    assert r.exit_code == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("pip ") and out[1].startswith("v18.") and out[2].startswith("10.")
    assert out[3].startswith("git version 2.") and out[4].startswith("curl 7.")


def test_the_sdk_template_helpers_build_from_base(sdk_env: Server) -> None:
    from e2b import Sandbox, Template

    template = (Template().from_template("base")
                .pip_install("six==1.16.0")
                .npm_install("is-number@7.0.0", g=True)
                .run_cmd("git init -q -b main /tmp/origin && cd /tmp/origin && echo hello > README && "
                         "git add README && git -c user.name=t -c user.email=t@e commit -qm first")
                .git_clone("/tmp/origin", "/home/user/cloned", branch="main", depth=1))
    Template.build(template, "e2e-base-helpers")
    sbx = Sandbox.create("e2e-base-helpers", timeout=120)
    try:
        r = sbx.commands.run("python3 -c 'import six; print(six.__version__)' && "
                             "NODE_PATH=$(npm root -g) node -e \"console.log(require('is-number')(5))\" && "
                             "cat /home/user/cloned/README")
        assert r.exit_code == 0, r.stderr
        assert r.stdout.splitlines() == ["1.16.0", "true", "hello"]
    finally:
        sbx.kill()


def test_sandbox_git_clones_commits_and_pushes_to_a_git_daemon_in_the_sandbox(sandbox: Any) -> None:
    seed = ("mkdir -p /tmp/srv && git init -q --bare -b main /tmp/srv/proj.git && "
            "git init -q -b main /tmp/seed && cd /tmp/seed && echo one > a.txt && git add a.txt && "
            "git -c user.name=s -c user.email=s@e commit -qm seed && git push -q /tmp/srv/proj.git main")
    r = sandbox.commands.run(seed)
    assert r.exit_code == 0, r.stderr
    daemon = ("git daemon --detach --reuseaddr --export-all --enable=receive-pack --base-path=/tmp/srv "
              "--listen=127.0.0.1 --port=9418 --pid-file=/tmp/gitd.pid && "
              "timeout 30 sh -c 'until git ls-remote git://127.0.0.1/proj.git; do sleep 0.2; done'")
    r = sandbox.commands.run(daemon)
    assert r.exit_code == 0, r.stderr

    sandbox.git.clone("git://127.0.0.1/proj.git", path="/home/user/proj")
    sandbox.files.write("/home/user/proj/b.txt", "two\n")
    sandbox.git.add("/home/user/proj", all=True)
    sandbox.git.commit("/home/user/proj", "add b", author_name="Ada", author_email="ada@example.com")
    sandbox.git.push("/home/user/proj", remote="origin", branch="main")
    log = sandbox.commands.run("git -C /tmp/srv/proj.git log --format='%an %s' main")
    assert log.stdout.splitlines() == ["Ada add b", "s seed"]
