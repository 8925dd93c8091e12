"""Which sandbox user a request acts as (e2b-protocol.md 3.3).

RPCs name the user in ``Authorization: Basic base64("<user>:")``; ``/files`` in the ``username``
query parameter. Without either, the ``/init`` default user applies.
"""

from __future__ import annotations

from .auth import basic_auth_user
from .connect import Code, ConnectError, RequestContext
from .state import EnvdState
from .users import UnknownUserError, User, lookup_user


def rpc_user(ctx: RequestContext, state: EnvdState) -> User:
    """The user of an RPC; unknown or malformed → Connect ``unauthenticated`` (as upstream)."""
    try:
        name = basic_auth_user(ctx.request_headers.get("authorization"))
    except ValueError as e:
        raise ConnectError(Code.UNAUTHENTICATED, str(e)) from e
    try:
        return lookup_user(name or state.default_user)
    except UnknownUserError as e:
        raise ConnectError(Code.UNAUTHENTICATED, f"invalid user: {e}") from e


def named_user(name: str | None, state: EnvdState) -> User:
    """The user of a /files request (raises UnknownUserError)."""
    return lookup_user(name or state.default_user)
