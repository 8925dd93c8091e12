"""The API's side of the node wire: one node's internal API, with the Orchestrator's method shapes.

A node that cannot be reached raises :class:`NodeUnreachable` (placement tries another node; a
call naming a sandbox answers 503 until the node comes back or is given up); an orchestrator
error on the node is raised here again as the same :class:`SandboxError`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import IO, Any

import httpx

from sandboxd.cluster.auth import SECRET_HEADER
from sandboxd.cluster.node_api import PREFIX
from sandboxd.cluster.tls import ClusterTls
from sandboxd.cluster.wire import error_of, request_json
from sandboxd.orchestrator.egress import EgressPolicy
from sandboxd.orchestrator.sandboxes import CreateRequest, SandboxError

#: a create waits for envd in the new sandbox (and one retry of a failed start)
CREATE_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 60.0


class NodeUnreachable(SandboxError):
    """503: the node holding a sandbox does not answer (until it is back or given up)."""

    def __init__(self, node_id: str, why: str) -> None:
        super().__init__(503, f"node {node_id} does not answer ({why}); try again shortly",
                         headers={"Retry-After": "2"})
        self.node_id = node_id


class NodeClient:
    def __init__(self, node_id: str, address: str, secret: str, tls: ClusterTls | None = None) -> None:
        self.node_id = node_id
        self.address = address.rstrip("/")
        self._http = httpx.Client(base_url=self.address + PREFIX, headers={SECRET_HEADER.decode(): secret},
                                  timeout=httpx.Timeout(CALL_TIMEOUT_S, connect=3.0), verify=ClusterTls.verify(tls))

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: Any = None, timeout: float = CALL_TIMEOUT_S,
              none_if_missing: bool = True) -> Any:
        """The node's answer; None for a 404 (the sandbox is not there) unless ``none_if_missing``
        is False (a create's 404 is an unknown template or snapshot: raised as the node said it)."""
        try:
            res = self._http.request(method, path, json=body, timeout=httpx.Timeout(timeout, connect=3.0))
        except httpx.TransportError as exc:
            raise NodeUnreachable(self.node_id, type(exc).__name__) from exc
        if res.status_code == 404 and none_if_missing:
            return None
        try:
            data = res.json()
        except ValueError:
            data = None
        if res.status_code >= 400:
            raise error_of(res.status_code, data, dict(res.headers))
        return data

    def create(self, req: CreateRequest) -> str:
        data = self._call("POST", "/sandboxes", request_json(req), timeout=CREATE_TIMEOUT_S, none_if_missing=False)
        if not data or "sandboxID" not in data:
            raise SandboxError(502, f"node {self.node_id} answered a create without a sandbox id")
        return str(data["sandboxID"])

    def kill(self, sandbox_id: str) -> bool:
        return self._call("DELETE", f"/sandboxes/{sandbox_id}") is not None

    def pause(self, sandbox_id: str, memory: bool, strict: bool) -> bool | None:
        data = self._call("POST", f"/sandboxes/{sandbox_id}/pause", {"memory": memory, "strict": strict},
                          timeout=CREATE_TIMEOUT_S)
        return None if data is None else data.get("paused")

    def resume(self, sandbox_id: str, timeout_s: int | None, memory: bool) -> bool:
        return self._call("POST", f"/sandboxes/{sandbox_id}/resume", {"timeout": timeout_s, "memory": memory},
                          timeout=CREATE_TIMEOUT_S) is not None

    def connect(self, sandbox_id: str, timeout_s: int | None) -> bool:
        return self._call("POST", f"/sandboxes/{sandbox_id}/connect", {"timeout": timeout_s}) is not None

    def set_timeout(self, sandbox_id: str, timeout_s: int) -> bool:
        return self._call("POST", f"/sandboxes/{sandbox_id}/timeout", {"timeout": timeout_s}) is not None

    def log_lines(self, sandbox_id: str) -> list[str] | None:
        data = self._call("GET", f"/sandboxes/{sandbox_id}/logs")
        return None if data is None else [str(line) for line in data.get("lines", [])]

    def metrics(self, sandbox_id: str, start: int | None = None, end: int | None = None,
                latest: bool = False) -> dict[str, Any] | None:
        params = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
        query = "&".join(f"{k}={v}" for k, v in params.items()) + ("&latest=true" if latest else "")
        return self._call("GET", f"/sandboxes/{sandbox_id}/metrics?{query.lstrip('&')}")

    def snapshot(self, sandbox_id: str, name: str | None, memory: bool | None) -> str | None:
        """The new snapshot's id (None: no such sandbox on the node)."""
        data = self._call("POST", f"/sandboxes/{sandbox_id}/snapshots", {"name": name, "memory": memory},
                          timeout=CREATE_TIMEOUT_S)
        return None if data is None else str(data["snapshotID"])

    def fork(self, sandbox_id: str, count: int, timeout_s: int) -> list[str | SandboxError] | None:
        """Per fork, its sandbox id or its error (None: no such sandbox on the node)."""
        data = self._call("POST", f"/sandboxes/{sandbox_id}/fork", {"count": count, "timeout": timeout_s},
                          timeout=CREATE_TIMEOUT_S * 2)
        if data is None:
            return None
        return [str(r["sandboxID"]) if "sandboxID" in r else error_of(int(r["error"]["code"]), r["error"], {})
                for r in data["results"]]

    def delete_snapshot(self, snapshot_id: str) -> bool:
        return self._call("DELETE", f"/snapshots/{snapshot_id}") is not None

    def drop_snapshot_copies(self, snapshot_id: str) -> int:
        """The node removes its copies of a deleted snapshot (those it fetched); how many."""
        data = self._call("DELETE", f"/snapshot-copies/{snapshot_id}")
        return int((data or {}).get("removed", 0))

    def create_volume(self, name: str) -> str:
        data = self._call("POST", "/volumes", {"name": name}, none_if_missing=False)
        return str(data["volumeID"])

    def destroy_volume(self, volume_id: str) -> bool:
        return self._call("DELETE", f"/volumes/{volume_id}") is not None

    # -- template builds (run on this node; their records are in the shared database) ----------

    def files_present(self, files_hash: str) -> bool:
        data = self._call("GET", f"/files/{files_hash}", none_if_missing=False)
        return bool(data and data.get("present"))

    def put_files(self, files_hash: str, stream: IO[bytes]) -> int:
        """Send a COPY context's tar (streamed) into the node's files cache."""
        def chunks() -> Iterator[bytes]:
            while chunk := stream.read(1 << 20):
                yield chunk

        try:
            res = self._http.put(f"/files/{files_hash}", content=chunks(),
                                 timeout=httpx.Timeout(CREATE_TIMEOUT_S, connect=3.0))
        except httpx.TransportError as exc:
            raise NodeUnreachable(self.node_id, type(exc).__name__) from exc
        data = res.json() if res.headers.get("content-type", "").startswith("application/json") else None
        if res.status_code >= 400:
            raise error_of(res.status_code, data, dict(res.headers))
        return int((data or {}).get("stored", 0))

    def start_build(self, build_id: str, body: dict[str, Any]) -> bool:
        """Start the build on the node; False: it was already started."""
        try:
            self._call("POST", f"/template-builds/{build_id}", body, none_if_missing=False)
        except SandboxError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def update_network(self, sandbox_id: str, policy: EgressPolicy) -> bool:
        body = {"egress": policy.to_json(), "allow_internet_access": not policy.denies_all}
        return self._call("PUT", f"/sandboxes/{sandbox_id}/network", body) is not None


class NodeClients:
    """One client per node address, made on first use (connections are pooled per node)."""

    def __init__(self, secret: str, tls: ClusterTls | None = None) -> None:
        self._secret = secret
        self._tls = tls
        self._clients: dict[tuple[str, str], NodeClient] = {}
        self._guard = threading.Lock()

    def get(self, node_id: str, address: str) -> NodeClient:
        with self._guard:
            client = self._clients.get((node_id, address))
            if client is None:
                client = self._clients[(node_id, address)] = NodeClient(node_id, address, self._secret, self._tls)
            return client

    def close(self) -> None:
        with self._guard:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
