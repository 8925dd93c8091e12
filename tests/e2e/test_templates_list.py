"""``GET /templates`` and ``GET /templates/{id}`` read by the SDK's own generated client (it parses a
body only if every key it requires is there): ``base``, and a template whose only build failed."""

from __future__ import annotations

import httpx
import pytest

from .conftest import Server

pytestmark = pytest.mark.slow


def _client(server: Server):
    from e2b.api.client.client import AuthenticatedClient

    return AuthenticatedClient(base_url=server.url, token=server.api_key, prefix="", auth_header_name="X-API-Key",
                               timeout=httpx.Timeout(120))


def test_templates_list_and_details(sdk_env: Server) -> None:
    from e2b import Template
    from e2b.api.client.api.templates import get_templates, get_templates_template_id
    from e2b.api.client.models import TemplateBuildStatus

    with pytest.raises(Exception, match="exit"):
        Template.build(Template().from_template("base").run_cmd("echo listing; exit 7"), "e2e-list-failed")

    client = _client(sdk_env)
    listed = get_templates.sync_detailed(client=client)
    assert listed.status_code == 200 and listed.parsed is not None, listed.content
    by_name = {t.aliases[0]: t for t in listed.parsed}
    base = by_name["base"]
    assert base.build_status == TemplateBuildStatus.READY and base.public is False and base.names == ["base"]
    assert base.cpu_count >= 1 and base.memory_mb >= 128 and base.disk_size_mb >= 16 and base.envd_version
    failed = by_name["e2e-list-failed"]
    assert failed.build_status == TemplateBuildStatus.ERROR and failed.build_count >= 1

    details = get_templates_template_id.sync_detailed(failed.template_id, client=client, limit=1)
    assert details.status_code == 200 and details.parsed is not None, details.content
    assert details.parsed.template_id == failed.template_id and len(details.parsed.builds) == 1
    build = details.parsed.builds[0]
    assert build.status == TemplateBuildStatus.ERROR and str(build.build_id) == failed.build_id
    by_name_too = get_templates_template_id.sync_detailed("base", client=client)
    assert by_name_too.status_code == 200 and by_name_too.parsed.template_id == base.template_id

    with sdk_env.api() as api:
        assert api.get("/templates/no-such-template").status_code == 404
        bad = api.get("/templates", params={"teamID": "t1"})
        assert bad.status_code == 400 and "teamID" in bad.json()["message"]
        assert api.get(f"/templates/{failed.template_id}", params={"limit": 0}).status_code == 400
