"""envd: the daemon inside every sandbox (port 49983).

It speaks the E2B envd wire protocol (plain HTTP ``/health``, ``/init``, ``/envs``, ``/files`` plus
Connect RPC ``process.Process`` and ``filesystem.Filesystem`` with the JSON codec over HTTP/1.1), so
the unmodified ``e2b`` SDK drives it. It runs from the self-contained bundle at /opt/sandboxd, so it
depends only on the stdlib, h11, connectrpc and protobuf-py. What the host side may assume
about it (port, paths, argv, env, default user) is :mod:`sandboxd.envd.contract`.
"""

#: The envd protocol level we advertise to the SDK, which gates features on it (table 3.7 of the
#: protocol note). 0.6.4 unlocks every SDK feature; each is tested through the real SDK
#: (tests/e2e/test_envd_protocol.py). Lower it to switch features off deliberately.
ENVD_VERSION = "0.6.4"
