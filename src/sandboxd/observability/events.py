"""Counters and the create-latency histogram, updated by the orchestrator as things happen.

Module-level, in a registry of their own: one process serves one node, and the counters must
survive any number of apps built in it (tests build several).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

#: Seconds from the create request to envd answering; gVisor starts in ~1 s, a TCG microVM in ~10.
CREATE_BUCKETS = (0.25, 0.5, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)

CREATES = Counter("sandboxd_sandbox_creates", "Sandbox create requests by template and result "
                  "(ok, client_error: 4xx such as an unknown template, server_error: the start failed)",
                  ["template", "result"], registry=REGISTRY)
CREATE_SECONDS = Histogram("sandboxd_sandbox_create_seconds", "Time to a running sandbox (envd answering), "
                           "successful creates only", ["template"], buckets=CREATE_BUCKETS, registry=REGISTRY)
KILLS = Counter("sandboxd_sandbox_kills", "Sandboxes killed, by reason (api: a kill request, timeout: "
                "their time was up)", ["reason"], registry=REGISTRY)
PAUSES = Counter("sandboxd_sandbox_pauses", "Sandboxes paused, by what was kept", ["kept"], registry=REGISTRY)
RESUMES = Counter("sandboxd_sandbox_resumes", "Sandboxes resumed", registry=REGISTRY)
API_ERRORS = Counter("sandboxd_api_errors", "Error responses of the API by status and E2B error code "
                     "(bad input 400, unknown key 401, not found 404, conflicts 409, 5xx)", ["status", "error_code"],
                     registry=REGISTRY)
TEMPLATE_BUILDS = Counter("sandboxd_template_builds_finished", "Template builds finished, by result",
                          ["result"], registry=REGISTRY)


@contextlib.contextmanager
def observe_create(template: str) -> Iterator[None]:
    """Count one create and time it; a raised error with a ``status`` < 500 is the client's."""
    started = time.monotonic()
    try:
        yield
    except Exception as exc:
        status = getattr(exc, "status", 500)
        CREATES.labels(template, "client_error" if isinstance(status, int) and status < 500 else "server_error").inc()
        raise
    CREATES.labels(template, "ok").inc()
    CREATE_SECONDS.labels(template).observe(time.monotonic() - started)
