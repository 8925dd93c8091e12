"""envd: the daemon inside every sandbox (port 49983).

It speaks the E2B envd wire protocol (plain HTTP ``/health``, ``/init``, ``/envs``, ``/files`` plus
Connect RPC ``process.Process`` and ``filesystem.Filesystem`` with the JSON codec over HTTP/1.1), so
the unmodified ``e2b`` SDK drives it. It runs from the self-contained bundle at /opt/sandboxd, so it
depends only on the stdlib, uvicorn (h11), connectrpc and protobuf-py.
"""

#: The envd version we claim to be wire-compatible with (the SDK gates features on it, >= 0.6.4).
ENVD_VERSION = "0.6.13"
DEFAULT_PORT = 49983
