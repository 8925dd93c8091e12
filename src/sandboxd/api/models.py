"""Request bodies and response shapes of E2B's REST API (the keys the SDK sends and requires)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sandboxd.store.db import SandboxRow

CLIENT_ID = "sandboxd"


class _Strict(BaseModel):
    """A body whose unknown keys are a 400 naming them: an option sandboxd does not know is never
    silently dropped (E2B's own server ignores them; a user asking for a locked-down sandbox and
    getting an open one would not be told)."""

    model_config = ConfigDict(extra="forbid")


class AutoResume(_Strict):
    enabled: bool


class VolumeMount(_Strict):
    name: str
    path: str


class NetworkConfig(_Strict):
    """``network`` of a create body (SDK ``network={...}``; the SDK sends camelCase)."""

    allowPublicTraffic: bool | None = None
    allowOut: list[str] | None = None
    denyOut: list[str] | None = None
    dnsServers: list[str] | None = None
    maskRequestHost: str | None = Field(default=None, min_length=1, max_length=253)
    httpsPorts: list[int] | None = None
    egressProxy: dict[str, Any] | None = None  # 501: see unsupported_options
    rules: Any = None  # checked by EgressPolicy.parse (400s naming the key)


class NetworkUpdate(_Strict):
    """``PUT /sandboxes/{id}/network``: replaces all egress rules (omitted fields are cleared)."""

    allowOut: list[str] | None = None
    denyOut: list[str] | None = None
    dnsServers: list[str] | None = None
    allow_internet_access: bool | None = None
    egressProxy: dict[str, Any] | None = None
    rules: Any = None


class NewSandbox(_Strict):
    """``POST /v2/sandboxes``: every key any released SDK sends; each one is implemented or
    answered with a 501 naming it (:func:`unsupported_options`)."""

    templateID: str = Field(default="base", min_length=1, max_length=256)
    timeout: int | None = Field(default=None, ge=1)
    metadata: dict[str, str] | None = None
    envVars: dict[str, str] | None = None
    allow_internet_access: bool | None = None
    autoPause: bool | None = None
    autoPauseMemory: bool | None = None  # False: the timeout's pause keeps the disk alone
    autoResume: AutoResume | None = None
    network: NetworkConfig | None = None
    mcp: dict[str, Any] | None = None
    iam: dict[str, Any] | None = None
    volumeMounts: list[VolumeMount] | None = None


class NewSandboxV1(NewSandbox):
    """``POST /sandboxes`` (v1 create, sent by SDKs up to 2.45): as v2, plus ``secure`` (absent or
    false: envd without an access token, as SDK 1.x asks by default) and E2B's 15 s default timeout."""

    secure: bool = False


def unsupported_options(body: NewSandbox | NetworkUpdate) -> str | None:
    """The first option of a body that sandboxd cannot honour yet, as ``field: why`` (a 501);
    None if every option it carries is implemented."""
    if isinstance(body, NetworkUpdate):
        net: NetworkConfig | NetworkUpdate | None = body
        prefix = ""
    else:
        net, prefix = body.network, "network."
        if body.mcp:
            return "mcp: MCP gateways in sandboxes are not implemented"
        if body.iam and body.iam.get("tokens"):
            return "iam.tokens: workload identity tokens are not implemented"
    if net is not None and net.egressProxy is not None:
        return f"{prefix}egressProxy: tunnelling egress through a SOCKS5 proxy is not implemented"
    return None


class ResumeBody(_Strict):
    """``POST /sandboxes/{id}/resume`` (deprecated; SDK 2.0.x and JS 2.0.x send it)."""

    timeout: int = Field(default=15, ge=0)
    autoPause: bool | None = None
    memory: bool = True


class RefreshBody(BaseModel):
    """``POST /sandboxes/{id}/refreshes``: keep the sandbox alive ``duration`` seconds more."""

    duration: int | None = Field(default=None, ge=0, le=3600)


class PauseBody(_Strict):
    """``POST /sandboxes/{id}/pause``; older SDKs send no body."""

    memory: bool = True  # False: keep the filesystem alone; resuming boots the sandbox again
    requireHealthyGuest: bool = False  # refuse (503) when envd does not answer


class TimeoutBody(BaseModel):
    """``POST /sandboxes/{id}/timeout``."""

    timeout: int = Field(ge=0)


class ConnectBody(_Strict):
    """``POST /v2/sandboxes/{id}/connect``; the SDK usually sends ``{}``."""

    timeout: int | None = Field(default=None, ge=0)
    memory: bool = True  # False: a paused sandbox boots again over its files (memory is dropped)


def iso(dt: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, as E2B answers (SQLite returns naive UTC datetimes)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sandbox_json(row: SandboxRow, domain: str | None) -> dict[str, Any]:
    """The ``Sandbox`` object of create and connect."""
    return {
        "sandboxID": row.sandbox_id,
        "templateID": row.template_id,
        "alias": row.alias,
        "clientID": CLIENT_ID,
        "envdVersion": row.envd_version,
        "envdAccessToken": row.envd_access_token or None,  # none: created with v1 ``secure: false``
        "trafficAccessToken": row.traffic_access_token,  # set only with allowPublicTraffic: false
        "domain": domain,
    }


def listed_json(row: SandboxRow) -> dict[str, Any]:
    """``ListedSandbox``: every required key, ``state`` exactly ``running`` or ``paused``."""
    return {
        "templateID": row.template_id,
        "alias": row.alias,
        "sandboxID": row.sandbox_id,
        "clientID": CLIENT_ID,
        "startedAt": iso(row.started_at),
        "endAt": iso(row.end_at),
        "cpuCount": row.cpu_count,
        "memoryMB": row.memory_mb,
        "diskSizeMB": row.disk_size_mb,
        "state": row.state,
        "envdVersion": row.envd_version,
        "metadata": row.metadata_ or {},
    }


def detail_json(row: SandboxRow, domain: str | None) -> dict[str, Any]:
    """``SandboxDetail`` of ``GET /sandboxes/{id}``."""
    return {
        **listed_json(row),
        "envdAccessToken": row.envd_access_token or None,  # none: created with v1 ``secure: false``
        "domain": domain,
        "allowInternetAccess": row.allow_internet_access,
        "lifecycle": {"autoResume": row.auto_resume, "onTimeout": "pause" if row.auto_pause else "kill"},
        "network": network_json(row),
        **({"envdUnresponsiveAtPause": True} if row.state == "paused" and row.envd_unresponsive_at_pause else {}),
    }


def network_json(row: SandboxRow) -> dict[str, Any]:
    """``SandboxNetworkConfig`` as the sandbox has it now (after any ``update_network``)."""
    out: dict[str, Any] = {"allowPublicTraffic": row.traffic_access_token is None}
    if row.egress:
        out.update(row.egress)
    elif not row.allow_internet_access:
        out["denyOut"] = ["0.0.0.0/0"]
    if row.mask_request_host:
        out["maskRequestHost"] = row.mask_request_host
    if row.https_ports:
        out["httpsPorts"] = list(row.https_ports)
    return out
