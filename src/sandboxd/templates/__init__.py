"""sandboxd.templates: template builds, stored by content hash, never mutated.

- ``envd_bundle``: the self-contained envd runtime (own CPython, libs, loader, tini) at /opt/sandboxd;
  how PID 1 starts it (``envd_argv()``, ``envd_env()``) is the guest contract, ``sandboxd.envd.contract``.
- ``store``: ``TemplateStore`` — ``<data_dir>/templates/<build_id>/{rootfs/, meta.json, build.log}``,
  build id = hash of the inputs, atomic publish, ``verify()`` by tree checksum.
- ``check``: run things in a rootfs through a throw-away overlay; the "envd answers /health" gate.
- ``base``: the ``base`` (Debian bookworm, E2B conventions) and ``tiny`` (busybox, no libc) templates.
"""
