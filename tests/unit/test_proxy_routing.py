"""How the proxy tells sandbox traffic from control-plane traffic."""

from __future__ import annotations

from sandboxd.proxy.asgi import route_of


def scope(**headers: str) -> dict:
    return {"type": "http", "path": "/process.Process/Start",
            "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}


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


def test_control_plane_calls_that_carry_sandbox_headers_go_to_the_api() -> None:
    """SDK 2.1-2.2x send E2b-Sandbox-Id/-Port on POST /sandboxes/{id}/connect: not envd's."""
    headers = [(b"e2b-sandbox-id", b"abc"), (b"e2b-sandbox-port", b"49983")]
    assert route_of({"type": "http", "path": "/sandboxes/abc/connect", "headers": headers}) is None
    assert route_of({"type": "http", "path": "/process.Process/Start", "headers": headers}) == ("abc", 49983)
    assert route_of({"type": "http", "path": "/files", "headers": headers}) == ("abc", 49983)
    other_port = [(b"e2b-sandbox-id", b"abc"), (b"e2b-sandbox-port", b"8080")]
    assert route_of({"type": "http", "path": "/sandboxes/abc/connect", "headers": other_port}) == ("abc", 8080)


def test_an_envd_call_without_sandbox_headers_is_routed_by_its_access_token() -> None:
    """SDK 2.1-2.2x drop E2b-Sandbox-Id after Sandbox.connect when E2B_SANDBOX_URL is set."""
    from sandboxd.proxy.asgi import token_route

    tokens = {"secret-of-abc": "abc"}
    def call(path: str, token: str | None) -> dict:
        return {"type": "http", "path": path, "headers": [(b"x-access-token", token.encode())] if token else []}
    assert token_route(call("/files", "secret-of-abc"), tokens.get) == ("abc", 49983)
    assert token_route(call("/process.Process/Start", "secret-of-abc"), tokens.get) == ("abc", 49983)
    assert token_route(call("/files", "someone-else"), tokens.get) is None
    assert token_route(call("/files", None), tokens.get) is None
    assert token_route(call("/sandboxes/abc", "secret-of-abc"), tokens.get) is None  # the API's
