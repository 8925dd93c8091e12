"""Every error the API returns is ``{"code": int, "message": str}``.

The SDK's generated client reads ``code`` and ``message`` from every non-2xx body and crashes with a
KeyError on FastAPI's default ``{"detail": ...}``, so all handlers (404, 405, 422, 500) answer in
this one shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sandboxd.observability import events
from sandboxd.orchestrator.sandboxes import SandboxError

log = logging.getLogger("sandboxd.api")


class ApiError(Exception):
    """Raise anywhere in a route to answer ``status`` with ``message`` (and E2B's machine-readable
    ``error_code`` where it has one)."""

    def __init__(self, status: int, message: str, error_code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers


def error_response(status: int, message: str, headers: dict[str, str] | None = None,
                   error_code: str | None = None) -> JSONResponse:
    events.API_ERRORS.labels(str(status), error_code or "").inc()
    body: dict[str, object] = {"code": status, "message": message}
    if error_code:
        body["error_code"] = error_code
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers, error_code=exc.error_code)

    @app.exception_handler(SandboxError)
    async def _sandbox_error(_: Request, exc: SandboxError) -> JSONResponse:
        """The orchestrator's errors, in one place: status, message and E2B's ``error_code``; a
        create it already retried tells the SDK not to retry again."""
        headers = {"Should-Retry": "false"} if exc.final and exc.status >= 500 else None
        return error_response(exc.status, exc.message, exc.headers or headers, error_code=exc.error_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _validation_message(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
