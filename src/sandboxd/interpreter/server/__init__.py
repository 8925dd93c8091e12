"""The code-interpreter server that runs inside a sandbox (see :mod:`.app`). Imports only the
standard library, starlette, uvicorn and jupyter_client, which the template installs."""
