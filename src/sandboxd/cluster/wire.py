"""What crosses the API↔node wire: a create request and an orchestrator error, as JSON.

Sandbox records do not cross it: the node writes them to the shared database and the API reads
them there, so both see one truth.
"""

from __future__ import annotations

from typing import Any

from sandboxd.orchestrator.egress import EgressPolicy
from sandboxd.orchestrator.sandboxes import CreateRequest, SandboxError

#: response headers of an orchestrator error the API passes on to the SDK
PASSED_HEADERS = ("retry-after", "should-retry")


def request_json(req: CreateRequest) -> dict[str, Any]:
    return {
        "template": req.template, "timeout_s": req.timeout_s, "metadata": req.metadata, "env_vars": req.env_vars,
        "allow_internet_access": req.allow_internet_access,
        "egress": req.egress.to_json() if req.egress is not None else None,
        "auto_pause": req.auto_pause, "auto_pause_memory": req.auto_pause_memory, "auto_resume": req.auto_resume,
        "secure": req.secure, "allow_public_traffic": req.allow_public_traffic,
        "mask_request_host": req.mask_request_host, "https_ports": list(req.https_ports),
        "idempotency_key": req.idempotency_key, "owner": req.owner,
        # a snapshot's capture is on one node: that node seeds the sandbox from its own copy
        "snapshot": req.seed.template_id if req.seed is not None else None,
        "volume_mounts": [dict(m) for m in req.volume_mounts],  # the volumes are on the node it goes to
    }


def request_of(data: dict[str, Any]) -> CreateRequest:
    egress = data.get("egress")
    allow_internet = bool(data.get("allow_internet_access", True))
    return CreateRequest(
        template=str(data["template"]), timeout_s=int(data["timeout_s"]), metadata=dict(data.get("metadata") or {}),
        env_vars=dict(data.get("env_vars") or {}), allow_internet_access=allow_internet,
        egress=EgressPolicy.from_json(egress, allow_internet) if egress is not None else None,
        auto_pause=bool(data.get("auto_pause")), auto_pause_memory=bool(data.get("auto_pause_memory", True)),
        auto_resume=bool(data.get("auto_resume")), secure=bool(data.get("secure", True)),
        allow_public_traffic=bool(data.get("allow_public_traffic", True)),
        mask_request_host=data.get("mask_request_host"), https_ports=tuple(data.get("https_ports") or ()),
        idempotency_key=data.get("idempotency_key"), owner=data.get("owner"),
        volume_mounts=tuple({str(k): str(v) for k, v in m.items()} for m in data.get("volume_mounts") or ()))


def error_json(exc: SandboxError) -> dict[str, Any]:
    return {"code": exc.status, "message": exc.message, "error_code": exc.error_code, "final": exc.final}


def error_of(status: int, body: Any, headers: dict[str, str]) -> SandboxError:
    """The node's error as the API raises it again (its status, message, code and retry hints)."""
    if not isinstance(body, dict):
        body = {}
    exc = SandboxError(int(body.get("code") or status), str(body.get("message") or f"node answered {status}"),
                       body.get("error_code"),
                       {k: v for k, v in headers.items() if k.lower() in PASSED_HEADERS} or None)
    exc.final = bool(body.get("final"))
    return exc
