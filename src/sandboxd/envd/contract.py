"""The guest contract: what the host side and envd inside a sandbox agree on, named once.

Templates install envd at :data:`BUNDLE_PATH_IN_SANDBOX`; runtimes start it as a sandbox's init
with :func:`envd_argv` and :func:`envd_env`; the orchestrator and the proxy dial :data:`ENVD_PORT`;
envd gives the processes it starts :data:`DEFAULT_PATH`, and a template that names no user or
workdir runs as :data:`DEFAULT_USER` in :data:`DEFAULT_WORKDIR` (E2B's defaults).

Stdlib only: this module ships inside the envd bundle too. Its bytes are part of the bundle's
hash, so of every template's build id, and of the template builder's layer keys
(``templates/steps.py``): no sandbox can run against a contract its template was not built for.
See docs/architecture.md, "The guest contract".
"""

from __future__ import annotations

#: envd's port in every sandbox (E2B's); the proxy routes ``49983-<sandbox id>`` to it
ENVD_PORT = 49983
#: ``POST /init``'s field (ours, beside E2B's) carrying new entropy, base64, after a memory restore
INIT_ENTROPY_FIELD = "sandboxdEntropy"
#: where the self-contained envd bundle (its own CPython, libs, loader, tini) lives in a rootfs
BUNDLE_PATH_IN_SANDBOX = "/opt/sandboxd"
#: the bundle's dynamic loader: envd runs through it, never through the template's libc
LOADER_NAME = "ld-linux-x86-64.so.2"
#: PATH for envd, for the processes it starts and for build steps (seed 000: the wrapper set none)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: E2B's default user and working directory, for templates that set neither
DEFAULT_USER = "user"
DEFAULT_WORKDIR = "/home/user"
#: the real sudo in a rootfs (envd's sudo broker runs it; gVisor's wrapper hands over to it as root)
SUDO = "/usr/bin/sudo"


def python_argv(*args: str, bundle_root: str = BUNDLE_PATH_IN_SANDBOX) -> list[str]:
    """argv running the bundle's python (isolated, no bytecode writes, unbuffered, ``-OO``) with
    ``args``; the same interpreter invocation envd gets, minus tini. Used by build checks and tests.
    ``-OO`` drops docstrings (and asserts) from the code envd keeps in memory for a sandbox's whole
    life: 1.3 MiB less per idle sandbox; the bundle ships its bytecode precompiled for it."""
    return [f"{bundle_root}/lib/{LOADER_NAME}", "--library-path", f"{bundle_root}/lib",
            f"{bundle_root}/bin/python3", "-I", "-B", "-u", "-OO", *args]


def envd_argv(port: int | None = None) -> list[str]:
    """argv for PID 1 of a sandbox.

    tini (``-s``: also reaps when it is not PID 1) reaps zombies and forwards signals; envd runs
    through the bundle's own loader so the template's libc (if any) is never used. ``-I`` (isolated:
    ignore PYTHON* variables, user site and cwd) means nothing envd needs is passed through the
    environment, so nothing leaks into processes envd starts (a ``PYTHONHOME`` there would break the
    template's own python3). CPython finds its prefix from argv[0] (/opt/sandboxd/bin/python3, set
    by the loader) — checked by every template build. ``-B``: the bundle is a read-only lower layer;
    ``-u``: envd's output reaches the console unbuffered (seed 000: its output was lost). No flag
    envd does not define (seed 000: a wrapper passed ``--debug``, and envd never started).
    """
    argv = [f"{BUNDLE_PATH_IN_SANDBOX}/bin/tini", "-s", "--", *python_argv("-m", "sandboxd.envd")]
    if port is not None:
        argv += ["--port", str(port)]
    return argv


def envd_env() -> dict[str, str]:
    """Environment for envd: a real PATH (seed 000: the wrapper set none) and a UTF-8 locale
    that exists in every glibc, and its out-of-memory guard on (envd_env is only ever given to
    envd as a sandbox's init). Deliberately no PYTHON* variables (see :func:`envd_argv`)."""
    return {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", "HOME": "/root", "ENVD_OOM_GUARD": "1"}
