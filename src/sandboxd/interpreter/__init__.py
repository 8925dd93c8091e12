"""The code interpreter: E2B's ``code-interpreter-v1`` template, built by sandboxd's own builder.

- :mod:`sandboxd.interpreter.template` is the recipe (the e2b SDK's ``Template`` builder, so it is
  what a user would write to extend it) and the background build ``serve`` starts after ``base``.
- :mod:`sandboxd.interpreter.server` is copied into the template and runs inside each sandbox on
  port 49999: the HTTP API the ``e2b-code-interpreter`` SDKs call, with Jupyter kernels behind it.
  It runs on the sandbox's Python (3.11, Debian bookworm), never in the sandboxd process.
"""
