"""Request bodies and response shapes of E2B's REST API (the keys the SDK sends and requires)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sandboxd.store.db import SandboxRow

CLIENT_ID = "sandboxd"


class NewSandbox(BaseModel):
    """``POST /v2/sandboxes``. Unknown keys (network, mcp, volumeMounts, ...) are accepted and ignored
    until they are supported, exactly like an older E2B server would."""

    model_config = ConfigDict(extra="ignore")
    templateID: str = Field(default="base", min_length=1, max_length=256)
    timeout: int | None = Field(default=None, ge=1)
    metadata: dict[str, str] | None = None
    envVars: dict[str, str] | None = None
    allow_internet_access: bool | None = None
    autoPause: bool | None = None
    autoPauseMemory: bool | None = None  # False: the timeout's pause keeps the disk alone


class NewSandboxV1(NewSandbox):
    """``POST /sandboxes`` (v1 create, sent by SDKs up to 2.45): as v2, plus ``secure`` (absent or
    false: envd without an access token, as SDK 1.x asks by default) and E2B's 15 s default timeout."""

    secure: bool = False


class ResumeBody(BaseModel):
    """``POST /sandboxes/{id}/resume`` (deprecated; SDK 2.0.x and JS 2.0.x send it)."""

    model_config = ConfigDict(extra="ignore")
    timeout: int = Field(default=15, ge=0)
    autoPause: bool | None = None
    memory: bool = True


class RefreshBody(BaseModel):
    """``POST /sandboxes/{id}/refreshes``: keep the sandbox alive ``duration`` seconds more."""

    duration: int | None = Field(default=None, ge=0, le=3600)


class PauseBody(BaseModel):
    """``POST /sandboxes/{id}/pause``; older SDKs send no body."""

    model_config = ConfigDict(extra="ignore")
    memory: bool = True  # False: keep the filesystem alone; resuming boots the sandbox again
    requireHealthyGuest: bool = False  # refuse (503) when envd does not answer


class TimeoutBody(BaseModel):
    """``POST /sandboxes/{id}/timeout``."""

    timeout: int = Field(ge=0)


class ConnectBody(BaseModel):
    """``POST /v2/sandboxes/{id}/connect``; the SDK usually sends ``{}``."""

    model_config = ConfigDict(extra="ignore")
    timeout: int | None = Field(default=None, ge=0)
    memory: bool = True  # False: a paused sandbox boots again over its files (memory is dropped)


def iso(dt: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, as E2B answers (SQLite returns naive UTC datetimes)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sandbox_json(row: SandboxRow, domain: str | None) -> dict[str, Any]:
    """The ``Sandbox`` object of create and connect."""
    return {
        "sandboxID": row.sandbox_id,
        "templateID": row.template_id,
        "alias": row.alias,
        "clientID": CLIENT_ID,
        "envdVersion": row.envd_version,
        "envdAccessToken": row.envd_access_token or None,  # none: created with v1 ``secure: false``
        "trafficAccessToken": None,
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
        "lifecycle": {"autoResume": False, "onTimeout": "pause" if row.auto_pause else "kill"},
        **({"envdUnresponsiveAtPause": True} if row.state == "paused" and row.envd_unresponsive_at_pause else {}),
    }
