"""Who may call envd and as whom: access token, signed /files URLs, the Basic-auth user.

Kept free of HTTP plumbing so the rules (taken from upstream envd, see e2b-protocol.md 3.2/3.3) are
testable on their own.
"""

from __future__ import annotations

import base64
import binascii
import time

# What hashlib and hmac fall back to without OpenSSL: the same sha256 and the same constant-time
# comparison, without loading libcrypto (4 MiB mapped, relocated and faulted in under gVisor,
# ~3 MiB resident per sandbox and ~20 ms of envd's start) for one digest and one comparison.
from _operator import _compare_digest as compare_digest
from _sha256 import sha256  # type: ignore[import-not-found]  # CPython module, no stub

SIGNATURE_PREFIX = "v1_"

#: Paths that never need X-Access-Token: health probes, the orchestrator's /init, and /files (which
#: does its own check so pre-signed URLs work).
TOKEN_EXEMPT = frozenset({("GET", "/health"), ("POST", "/init")})
FILES_PATH = "/files"


def tokens_equal(given: object, expected: str) -> bool:
    """Constant-time comparison, so the token cannot be guessed byte by byte from timings."""
    if not isinstance(given, str):
        return False
    return compare_digest(given.encode(), expected.encode())


def needs_token(method: str, path: str) -> bool:
    """Whether the generic X-Access-Token check applies to this request."""
    return (method, path) not in TOKEN_EXEMPT and path != FILES_PATH


def file_signature(path: str, operation: str, username: str, token: str, expiration: int | None) -> str:
    """The SDK's v1 signature: ``v1_`` + unpadded std base64 of sha256(path:op:user:token[:exp])."""
    raw = f"{path}:{operation}:{username}:{token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = sha256(raw.encode("utf-8")).digest()
    return SIGNATURE_PREFIX + base64.b64encode(digest).decode().rstrip("=")


def check_files_access(
    *,
    token: str | None,
    header_token: str | None,
    path: str,
    operation: str,
    username: str,
    signature: str | None,
    signature_expiration: str | None,
    now: float | None = None,
) -> str | None:
    """Authorize a /files request; ``None`` if allowed, else the reason for a 401.

    With no token configured everything passes. A present X-Access-Token header must match;
    otherwise a valid, unexpired signature over the raw ``path`` query value is required.
    """
    if token is None:
        return None
    # E2B's envd messages and order: the signature is checked before its expiration
    if header_token:
        return None if tokens_equal(header_token, token) else "access token present in header but does not match"
    if not signature:
        return "missing signature query parameter"
    expiration: int | None = None
    if signature_expiration:
        try:
            expiration = int(signature_expiration)
        except ValueError:
            return "invalid signature expiration"
    expected = file_signature(path, operation, username, token, expiration)
    if not compare_digest(signature.encode(), expected.encode()):
        return "invalid signature"
    if expiration is not None and expiration < (time.time() if now is None else now):
        return "signature is already expired"
    return None


def basic_auth_user(header: str | None) -> str | None:
    """Username from ``Authorization: Basic base64("<user>:")``; ``None`` when absent.

    Raises ValueError for a malformed header (the caller answers ``unauthenticated``).
    """
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise ValueError("unsupported authorization scheme")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as e:
        raise ValueError("malformed basic authorization") from e
    user, _, _password = decoded.partition(":")
    return user or None
