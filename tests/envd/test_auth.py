"""Access token (after /init) and signed /files URLs, incl. the SDK's signature test vectors."""

from __future__ import annotations

import time

import httpx
import pytest

from sandboxd.envd.auth import basic_auth_user, check_files_access, file_signature

from .conftest import Envd, free_port, run_envd
from .wire import STREAM_HEADERS, UNARY_HEADERS, chunked, envelope, parse_envelopes

TOKEN = "envd-token-abc"


def test_signature_vectors() -> None:
    assert file_signature("/home/user/hello.txt", "read", "", TOKEN, None) == \
        "v1_N0fAUHah9hiCF+wyWiySqWtNIlUtMaXsqh5PgeA/uOg"
    assert file_signature("/home/user/hello.txt", "write", "root", TOKEN, 1795390507) == \
        "v1_yNlip7mgFptOh5KOWD0qBi0wnzQS6RPI4iupN+rOAy0"


def test_check_files_access_rules() -> None:
    sig = "v1_yNlip7mgFptOh5KOWD0qBi0wnzQS6RPI4iupN+rOAy0"
    common = dict(token=TOKEN, header_token=None, path="/home/user/hello.txt", operation="write", username="root")
    assert check_files_access(**common, signature=sig, signature_expiration="1795390507", now=1795390000) is None
    # E2B's envd messages, the signature checked before its expiration
    assert check_files_access(**common, signature=sig, signature_expiration="1795390507",
                              now=1795390600) == "signature is already expired"
    assert check_files_access(**common, signature=sig, signature_expiration="1795390508",
                              now=1795390600) == "invalid signature"
    assert check_files_access(**common, signature=None, signature_expiration=None) == \
        "missing signature query parameter"
    assert check_files_access(**{**common, "header_token": "x"}, signature=None, signature_expiration=None) == \
        "access token present in header but does not match"
    assert check_files_access(**{**common, "operation": "read"}, signature=sig,
                              signature_expiration="1795390507", now=0)
    assert check_files_access(**common, signature=None, signature_expiration=None)
    assert check_files_access(**{**common, "token": None}, signature=None, signature_expiration=None) is None
    assert check_files_access(**{**common, "header_token": TOKEN}, signature=None, signature_expiration=None) is None
    assert check_files_access(**{**common, "header_token": "x"}, signature=sig, signature_expiration="1795390507")


def test_basic_auth_user() -> None:
    assert basic_auth_user(None) is None
    assert basic_auth_user("Basic cm9vdDo=") == "root"
    with pytest.raises(ValueError):
        basic_auth_user("Basic !!!")


@pytest.fixture(scope="module")
def locked() -> Envd:
    with run_envd(free_port()) as e:
        e.init(accessToken=TOKEN, timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        yield e


def test_health_needs_no_token(locked: Envd) -> None:
    assert httpx.get(f"{locked.url}/health").status_code == 204


def test_rpc_requires_token(locked: Envd) -> None:
    url = f"{locked.url}/process.Process/List"
    r = httpx.post(url, content=b"{}", headers=UNARY_HEADERS)
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
    r = httpx.post(url, content=b"{}", headers={**UNARY_HEADERS, "x-access-token": "wrong"})
    assert r.status_code == 401
    r = httpx.post(url, content=b"{}", headers={**UNARY_HEADERS, "x-access-token": TOKEN})
    assert r.status_code == 200 and r.json() == {}
    # a refused stream is a plain 401 JSON error up front
    body = chunked([envelope({"process": {"cmd": "/bin/true"}})])
    r = httpx.post(f"{locked.url}/process.Process/Start", content=body, headers=STREAM_HEADERS)
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
    body = chunked([envelope({"process": {"cmd": "/bin/true"}})])
    r = httpx.post(f"{locked.url}/process.Process/Start", content=body,
                   headers={**STREAM_HEADERS, "x-access-token": TOKEN})
    assert parse_envelopes(r.content)[-1] == (2, {})


def test_envs_requires_token(locked: Envd) -> None:
    assert httpx.get(f"{locked.url}/envs").status_code == 401
    assert httpx.get(f"{locked.url}/envs", headers={"x-access-token": TOKEN}).status_code == 200


def test_files_token_or_signature(locked: Envd, tmp_path) -> None:
    path = str(tmp_path / "s.txt")
    up = {"path": path}
    r = httpx.post(f"{locked.url}/files", params=up, files={"file": (path, b"x")})
    assert r.status_code == 401 and r.json()["code"] == 401
    r = httpx.post(f"{locked.url}/files", params=up, files={"file": (path, b"x")}, headers={"x-access-token": "bad"})
    assert r.status_code == 401
    exp = int(time.time()) + 60
    sig = file_signature(path, "write", "", TOKEN, exp)
    r = httpx.post(f"{locked.url}/files", params={**up, "signature": sig, "signature_expiration": exp},
                   files={"file": ("local-name.txt", b"signed")})
    assert r.status_code == 200, r.text
    assert r.json()[0]["path"] == path  # ?path= wins over the part's filename
    sig = file_signature(path, "read", "root", TOKEN, None)
    r = httpx.get(f"{locked.url}/files", params={"path": path, "username": "root", "signature": sig})
    assert r.status_code == 200 and r.content == b"signed"
    old = int(time.time()) - 1
    sig = file_signature(path, "read", "", TOKEN, old)
    r = httpx.get(f"{locked.url}/files", params={"path": path, "signature": sig, "signature_expiration": old})
    assert r.status_code == 401 and r.json() == {"code": 401, "message": "signature is already expired"}
    r = httpx.get(f"{locked.url}/files", params={"path": path}, headers={"x-access-token": TOKEN})
    assert r.status_code == 200


def test_metrics(locked: Envd) -> None:
    assert httpx.get(f"{locked.url}/metrics").status_code == 401
    m = httpx.get(f"{locked.url}/metrics", headers={"x-access-token": TOKEN}).json()
    assert set(m) == {"ts", "cpu_count", "cpu_used_pct", "mem_total", "mem_used", "mem_cache",
                      "mem_total_mib", "mem_used_mib", "disk_used", "disk_total"}
    assert m["cpu_count"] >= 1 and 0 <= m["cpu_used_pct"] <= 100
    assert 0 < m["mem_used"] <= m["mem_total"] and 0 < m["disk_used"] <= m["disk_total"]


def test_reinit_needs_the_current_token(locked: Envd) -> None:
    r = httpx.post(f"{locked.url}/init", json={"accessToken": "hijack", "defaultUser": "nobody"})
    assert r.status_code == 401
    r = httpx.post(f"{locked.url}/init", json={"accessToken": TOKEN, "envVars": {"RESUMED": "1"}})
    assert r.status_code == 204
    r = httpx.post(f"{locked.url}/init", json={"envVars": {"AGAIN": "1"}}, headers={"x-access-token": TOKEN})
    assert r.status_code == 204
    envs = httpx.get(f"{locked.url}/envs", headers={"x-access-token": TOKEN}).json()
    assert envs["RESUMED"] == "1" and envs["AGAIN"] == "1"


def test_init_with_bad_entropy_is_refused_whole(locked: Envd) -> None:
    """``sandboxdEntropy`` (new randomness after a restore) must be base64: else 400, and nothing
    of that /init is applied. (A valid one would reseed this host's kernel: the microVM e2e tests
    check that restored guests read different random bytes.)"""
    for bad in ("not base64!", 42):
        r = httpx.post(f"{locked.url}/init", json={"envVars": {"BAD_SEED": "1"}, "sandboxdEntropy": bad},
                       headers={"x-access-token": TOKEN})
        assert r.status_code == 400 and "sandboxdEntropy" in r.text
    envs = httpx.get(f"{locked.url}/envs", headers={"x-access-token": TOKEN}).json()
    assert "BAD_SEED" not in envs


def test_the_rules_do_not_load_openssl() -> None:
    """One sha256 and a constant-time comparison must not map libcrypto into every sandbox's
    envd (~3 MiB resident under gVisor and ~20 ms of its start)."""
    import subprocess
    import sys

    probe = ("import sys; import sandboxd.envd.auth; "
             "print(sorted(m for m in ('_hashlib', 'hashlib', 'hmac', 'ssl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
