"""How the proxy tells sandbox traffic from control-plane traffic."""

from __future__ import annotations

from sandboxd.proxy.asgi import route_of


def scope(**headers: str) -> dict:
    return {"type": "http", "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}


def test_headers_route() -> None:
    assert route_of(scope(e2b_sandbox_id="abc", e2b_sandbox_port="8080")) == ("abc", 8080)
    assert route_of(scope(**{"E2b-Sandbox-Id": "abc"})) == ("abc", 49983)
    assert route_of(scope(e2b_sandbox_id="abc", e2b_sandbox_port="99999")) == ("abc", -1)


def test_host_form_route() -> None:
    assert route_of(scope(host="49983-i0abc.sandbox.example")) == ("i0abc", 49983)
    assert route_of(scope(host="3000-abc.localhost:3000")) == ("abc", 3000)


def test_control_plane_is_not_routed() -> None:
    assert route_of(scope(host="127.0.0.1:3000")) is None
    assert route_of(scope(host="api.example.com")) is None
    assert route_of(scope()) is None
