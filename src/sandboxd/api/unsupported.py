"""Routes of E2B's API that released SDKs name but sandboxd does not serve (yet): a clear 501.

Without these, such a call would get a bare 404 or 405, which the SDKs turn into "sandbox not
found" or a confusing error. The table comes from the generated clients of Python ``e2b``
1.11-2.63 and JS ``e2b`` 2.0-2.51 (``tests/e2e/test_sdk_routes.py`` checks that every route they
name is either served or listed here). Included after every real router: a route that gets
implemented simply takes precedence.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends

from sandboxd.api.auth import require_api_key
from sandboxd.api.errors import ApiError

#: (method, path, what it is on E2B)
UNSUPPORTED: tuple[tuple[str, str, str], ...] = (
    ("GET", "/default-templates", "the list of E2B's public templates"),
    ("POST", "/templates", "the v1 template build (use Template.build: POST /v3/templates)"),
    ("POST", "/templates/{template_id}", "the v1 template rebuild (use Template.build)"),
    ("PATCH", "/templates/{template_id}", "updating a template"),
    ("POST", "/templates/{template_id}/builds/{build_id}", "the v1 template build (use Template.build)"),
    ("GET", "/templates/{template_id}/builds/{build_id}/logs", "paged build logs (the build status has them)"),
    ("GET", "/templates/{template_id}/tags/count", "tag counts"),
    ("GET", "/templates/{template_id}/tags/exists", "tag look-ups"),
    ("GET", "/templates/{template_id}/tags/groups", "tag groups"),
    ("GET", "/templates/{template_id}/tags/{tag}/assignments", "tag history"),
    ("GET", "/v2/templates", "listing templates"),
    ("POST", "/v2/templates", "the v2 template build (use Template.build: POST /v3/templates)"),
    ("PATCH", "/v2/templates/{template_id}", "updating a template"),
)


def _not_implemented(method: str, path: str, what: str) -> Callable[[], None]:
    def endpoint() -> None:
        raise ApiError(501, f"sandboxd does not implement {method} {path} ({what}) yet")

    endpoint.__name__ = f"unsupported_{method.lower()}_{path.strip('/').replace('/', '_')}"
    return endpoint


router = APIRouter(dependencies=[Depends(require_api_key)], include_in_schema=False)
for _method, _path, _what in UNSUPPORTED:
    router.add_api_route(_path, _not_implemented(_method, _path, _what), methods=[_method])
