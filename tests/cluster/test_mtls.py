"""A real cluster with mutual TLS between the API replica and the nodes (``SANDBOXD_CLUSTER_TLS_DIR``,
certificates from ``cluster/tls.py``): the SDK drives a sandbox through it, a node joining fetches
``base`` from another over mTLS, and a node refuses clients without a certificate of the cluster's
CA (and, with one, still wants the secret)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox

from sandboxd.testing.cluster import Cluster, running_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("cluster-mtls")
    c = None
    try:
        with running_cluster(data_dir, logs, apis=1, nodes=2, own_templates=(2,), tls=True) as c:
            yield c
    finally:
        if c is not None:
            print(c.logs())


def test_the_sdk_drives_a_sandbox_over_mtls_and_a_node_fetches_base_over_it(cluster: Cluster) -> None:
    api = cluster.apis[0]
    node1, node2 = cluster.nodes
    assert node1.url.startswith("https://") and node2.url.startswith("https://")
    assert "fetched from node node1 and verified" in node2.log()  # node → node over mTLS
    opts = {"api_key": cluster.api_key, "api_url": api.url, "sandbox_url": api.url}
    for _ in range(2):
        sbx = Sandbox.create(timeout=60, **opts)
        try:
            assert sbx.commands.run("echo $((6*7))").stdout == "42\n"  # API → node over mTLS (proxy)
            sbx.files.write("/tmp/x", "over mtls")
            assert sbx.files.read("/tmp/x") == "over mtls"
        finally:
            sbx.kill()


def test_a_node_refuses_clients_without_a_cluster_certificate(cluster: Cluster) -> None:
    assert cluster.tls is not None
    node = cluster.nodes[0]
    secret = {"x-sandboxd-cluster-secret": cluster.secret_file.read_text().strip()}
    health = node.url + "/internal/v1/health"
    no_cert = ssl.create_default_context(cafile=str(cluster.tls.ca))  # trusts the node, shows nothing
    with pytest.raises(httpx.HTTPError):
        httpx.get(health, headers=secret, verify=no_cert, timeout=5).raise_for_status()
    with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
        httpx.get(health.replace("https://", "http://"), headers=secret, timeout=5).raise_for_status()
    with_cert = cluster.tls.client_context()
    assert httpx.get(health, headers=secret, verify=with_cert, timeout=5).status_code == 200
    assert httpx.get(health, verify=with_cert, timeout=5).status_code == 401  # the secret is still required
