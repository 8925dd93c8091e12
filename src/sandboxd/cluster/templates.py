"""Template builds through an API replica: each build on one node, chosen when it is requested.

The public template routes (``api/templates.py``, the ones ``serve`` mounts) run unchanged over
this object. ``POST /v3/templates`` picks the build's node and records it with the build
(``template_builds.node_id``): a node already running a build of the same template (its COPY
uploads are there), else the best of ``placement_choices`` active nodes by free share, one
holding the template's current build first (its layers are in that node's cache; the build's
FROM is not known until it starts, and a node fetches a FROM template it lacks, verified). The
COPY uploads (``files/{hash}``: asked, then ``PUT`` through any replica, whose URL is signed with
a key derived from the cluster secret so every replica accepts it) and the start go to that node,
which runs the build as ``serve`` does and writes its logs and outcome to the shared database;
status, logs, aliases and tags are rows read here. A build whose node leaves the cluster ends
as failed, saying so (``Nodes.sweep``; :meth:`ClusterTemplates.settle` for a node already gone).
Other nodes fetch the finished build by id, checked against the checksum its node recorded
(``cluster/builds.py``).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import IO, Any

from sandboxd.api.errors import ApiError
from sandboxd.cluster.node_client import NodeClient
from sandboxd.cluster.placement import order
from sandboxd.cluster.remote import FULL_RETRY_AFTER_S, ClusterOrchestrator
from sandboxd.store.nodes_db import GONE, node_lost
from sandboxd.store.templates_db import ACTIVE, BuildResources, TemplateBuildRow, TemplateBuilds
from sandboxd.templates.spec import BuildSpec


def upload_key_of(secret: str) -> bytes:
    """The key signing COPY upload URLs: the same on every replica (the SDK's PUT may reach
    another replica than the one that signed it), and no secret's bytes are in the URL."""
    return hmac.new(secret.encode(), b"sandboxd template uploads", hashlib.sha256).digest()


class ClusterTemplates:
    """The template service's shape (``api.templates.TemplateBuildsHere``) over the nodes."""

    def __init__(self, orch: ClusterOrchestrator, secret: str) -> None:
        self.orch = orch
        self.builds = TemplateBuilds(orch.db)
        self.upload_key = upload_key_of(secret)

    def new_build(self, alias: str, tags: list[str], resources: BuildResources) -> TemplateBuildRow:
        return self.builds.new_build(alias, tags, resources, node_id=self._place(alias))

    def _place(self, alias: str) -> str:
        template_id = self.builds.template_id_for(alias)
        nodes = {n.node_id: n for n in self.orch.nodes.active()}
        for row in self.builds.active():
            if row.template_id == template_id and row.node_id in nodes:
                return row.node_id  # uploads keyed by the template's id go to one node
        ranked = order(list(nodes.values()), 0, 0, self.builds.resolve(alias), self.orch.settings.placement_choices,
                       self.orch.settings.node_timeout_s, self.orch.nodes.clock())
        if not ranked:
            raise ApiError(503, "no node can take a template build right now; try again later",
                           headers={"Retry-After": str(FULL_RETRY_AFTER_S)})
        return ranked[0].node_id

    def _client(self, node_id: str | None) -> NodeClient:
        node = self.orch.nodes.get(node_id) if node_id else None
        if node is None or node.state == GONE:
            raise ApiError(503, f"the node of this build, {node_id}, is not in the cluster now; build again")
        return self.orch.clients.get(node.node_id, node.address)

    def _node_for_files(self, template_id: str) -> NodeClient:
        row = self.builds.newest(template_id)
        if row is None and (named := self.builds.template(template_id)) is not None:
            row = self.builds.newest(named.template_id)
        if row is None:
            raise ApiError(404, f"template '{template_id}' has no build request: request one (POST /v3/templates) "
                                "before uploading its files")
        return self._client(row.node_id)

    def files_present(self, template_id: str, files_hash: str) -> bool:
        return self._node_for_files(template_id).files_present(files_hash)

    def put_files(self, template_id: str, files_hash: str, stream: IO[bytes]) -> int:
        return self._node_for_files(template_id).put_files(files_hash, stream)

    def start(self, row: TemplateBuildRow, body: dict[str, Any]) -> bool:
        BuildSpec.from_json(body)  # a bad body is a 400 here, before any node is asked
        return self._client(row.node_id).start_build(row.build_id, body)

    def settle(self, row: TemplateBuildRow) -> TemplateBuildRow:
        """A build whose node is no longer in the cluster is failed (the sweep does the same when
        it gives the node up; this covers a node removed outright)."""
        if row.status in ACTIVE and row.node_id is not None:
            node = self.orch.nodes.get(row.node_id)
            if node is None or node.state == GONE:
                self.builds.fail(row.build_id, node_lost(row.node_id))
                return self.builds.get(row.build_id) or row
        return row
