"""What envd's process does not import: the client side of connectrpc, and ``ssl``.

envd's start is most of a cold sandbox create, and every module it imports stays in the guest's
memory for the sandbox's life (gVisor keeps envd's heap in the host's shared memory). Two imports
serve no request of envd's:

- ``connectrpc``'s package imports ``importlib.metadata`` (for a client User-Agent), its gRPC
  protocol module (needed: envd serves gRPC too) imports the HTTP client ``pyqwest`` (a 16 MB
  native library) for names only its client half uses, and the generated ``*_connect.py`` import
  ``connectrpc.client`` for the stubs' client classes.
- ``ssl`` (and the OpenSSL state it sets up): envd serves plain HTTP (TLS ends at the host's
  proxy). asyncio is imported with ``ssl`` absent, its own supported no-TLS path; a later
  ``import ssl`` fails loudly.

:func:`skip_unused_imports` is called by envd's ``__main__`` only (the envd process of a
sandbox); it puts stand-ins for those modules in ``sys.modules`` before anything imports them, so
a library importing envd's modules (tests, the host) keeps the real ones. A stand-in that is used
after all fails loudly (:class:`NotInEnvd`), never silently.
"""

from __future__ import annotations

import sys
import types
from typing import Any

#: modules envd's process never loads (the client half of connectrpc)
CLIENT_SIDE = ("pyqwest", "connectrpc.client", "connectrpc._version")


class NotInEnvd:
    """Stand-in for a client-side class: subclassing it works (the generated stubs define their
    client classes at import), using it does not."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{type(self).__name__}: the connectrpc client side is not loaded in envd")


def _absent(module: str) -> Any:
    def __getattr__(name: str) -> Any:  # noqa: N807 - module __getattr__ (PEP 562)
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (NotInEnvd,), {"__module__": module})
    return __getattr__


def _stand_in(name: str, **attrs: Any) -> None:
    if sys.modules.get(name) is not None:
        return  # already the real one (imported by something that runs envd in-process)
    mod = types.ModuleType(name, f"envd stand-in: {name} is not loaded in envd (sandboxd.envd.lean)")
    mod.__dict__.update(attrs)
    if "__getattr__" not in attrs:
        mod.__getattr__ = _absent(name)  # type: ignore[method-assign]
    sys.modules[name] = mod


def skip_client_side() -> None:
    """Stand-ins for pyqwest, connectrpc.client and connectrpc._version (see the module doc)."""
    _stand_in("pyqwest")
    _stand_in("connectrpc._version", __version__="envd")
    _stand_in("connectrpc.client", ConnectClient=type("ConnectClient", (NotInEnvd,), {}),
              ConnectClientSync=type("ConnectClientSync", (NotInEnvd,), {}))


def skip_tls() -> None:
    """Import asyncio without ``ssl`` (see the module doc); needs to run before asyncio's import."""
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # asyncio: ``except ImportError: ssl = None``


def skip_unused_imports() -> None:
    skip_client_side()
    skip_tls()
