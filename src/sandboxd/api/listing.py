"""Which sandboxes a list call returns, in which order, one page at a time — as E2B's API does.

E2B (``packages/api/internal/handlers/sandboxes_list.go``): newest first unless ``order=asc``;
``startedAfter`` keeps sandboxes started at or after it; ``limit`` is clamped to 1..100; the page
cursor is the last sandbox's (start time, id), so sandboxes that start or end between two pages
neither repeat nor shift the rest. Descending pages by (time desc, id asc), ascending by the exact
reverse. A cursor names its order and is refused under the other one. ``X-Total-Running`` counts the
running sandboxes that pass the filters.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qsl, unquote

from sandboxd.api.errors import ApiError
from sandboxd.store.db import Database, SandboxRow

LISTED_STATES = ("running", "paused")  # "starting" sandboxes are not handed out yet
MAX_PAGE = 100
_ASC = "asc"


@dataclass(frozen=True)
class ListQuery:
    """A v2 list call's parameters, checked."""

    states: frozenset[str]
    metadata: dict[str, str]
    started_after: datetime | None
    template_id: str | None
    descending: bool
    limit: int
    cursor: tuple[int, str] | None  # (start time in µs, sandbox id) of the previous page's last


def parse_query(db: Database, *, metadata: str | None, state: str | None, started_after: datetime | None,
                template: str | None, order: str | None, limit: int | None,
                next_token: str | None) -> ListQuery | None:
    """The checked query; None when ``template`` names no template (the answer is then empty)."""
    if order not in (None, "asc", "desc"):
        raise ApiError(400, f"Invalid order parameter: unknown order {order!r} (use asc or desc)")
    descending = order != _ASC
    states = frozenset(s for s in (state or ",".join(LISTED_STATES)).split(",") if s)
    if not states or not states <= set(LISTED_STATES):
        raise ApiError(400, f"state: unknown sandbox state in {state!r} (use running, paused)")
    template_id = None
    if template:
        if ":" in template:
            raise ApiError(400, "Invalid template: tags are not supported here because sandboxes are not tag-scoped")
        found = db.find_template(template)
        if found is None:
            return None
        template_id = found.template_id
    return ListQuery(states=states, metadata=parse_metadata(metadata), started_after=started_after,
                     template_id=template_id, descending=descending,
                     limit=min(max(limit if limit is not None else MAX_PAGE, 1), MAX_PAGE),
                     cursor=decode_cursor(next_token, descending) if next_token else None)


def parse_metadata(raw: str | None) -> dict[str, str]:
    """The SDK encodes each key and value, joins them as a query string, and that string is
    encoded once more on the wire: undo the inner encoding after splitting."""
    if not raw:
        return {}
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise ApiError(400, f"metadata: cannot parse {raw!r} as key=value pairs") from exc
    return {unquote(k): unquote(v) for k, v in pairs}


def micros(dt: datetime) -> int:
    """A start time as whole microseconds since the epoch (the cursor's precision, as E2B's)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _matches(row: SandboxRow, q: ListQuery) -> bool:
    if row.state not in q.states:
        return False
    if q.template_id is not None and row.template_id != q.template_id:
        return False
    if q.started_after is not None and micros(row.started_at) < micros(q.started_after):
        return False
    return all((row.metadata_ or {}).get(k) == v for k, v in q.metadata.items())


def _after_cursor(row: SandboxRow, q: ListQuery) -> bool:
    if q.cursor is None:
        return True
    at, sandbox_id = q.cursor
    t = micros(row.started_at)
    if q.descending:
        return t < at or (t == at and row.sandbox_id > sandbox_id)
    return t > at or (t == at and row.sandbox_id < sandbox_id)


@dataclass(frozen=True)
class Page:
    rows: list[SandboxRow]
    next_token: str | None
    total_running: int


def page(rows: list[SandboxRow], q: ListQuery) -> Page:
    """Filter, order and cut one page; ``next_token`` only when more sandboxes follow."""
    matching = [r for r in rows if _matches(r, q)]
    total_running = sum(1 for r in matching if r.state == "running")
    rest = [r for r in matching if _after_cursor(r, q)]
    if q.descending:
        rest.sort(key=lambda r: (-micros(r.started_at), r.sandbox_id))
    else:
        rest.sort(key=lambda r: r.sandbox_id, reverse=True)
        rest.sort(key=lambda r: micros(r.started_at))  # stable sort: time asc, then id desc
    shown = rest[:q.limit]
    token = encode_cursor(shown[-1], q.descending) if len(rest) > q.limit else None
    return Page(shown, token, total_running)


def encode_cursor(row: SandboxRow, descending: bool) -> str:
    at = micros(row.started_at)
    when = datetime.fromtimestamp(at // 1_000_000, UTC).replace(microsecond=at % 1_000_000)
    text = f"{when.isoformat().replace('+00:00', 'Z')}__{row.sandbox_id}" + ("" if descending else f"__{_ASC}")
    return base64.urlsafe_b64encode(text.encode()).decode()


def decode_cursor(token: str, descending: bool) -> tuple[int, str]:
    """(µs, id) from a token this server made; 400 for anything else or a token of the other order."""
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        parts = text.split("__")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != _ASC) or not parts[1]:
            raise ValueError("invalid cursor format")
        if (len(parts) == 3) == descending:
            raise ValueError("cursor was issued for a different sort order")
        return micros(datetime.fromisoformat(parts[0])), parts[1]
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"nextToken: invalid next token ({exc})") from exc
