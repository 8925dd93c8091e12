"""The HTTP API on port 49999 that the ``e2b-code-interpreter`` SDKs (Python 2.x, JS 2.x) call.

- ``POST /execute`` ``{code, context_id, language, env_vars}`` → NDJSON events as the code runs;
  a client that disconnects (the SDK's ``timeout``) interrupts the kernel.
- ``POST /contexts`` ``{language, cwd}`` → ``{id, language, cwd}``; ``GET /contexts``;
  ``DELETE /contexts/{id}``; ``POST /contexts/{id}/restart``.
- ``GET /health``.

Errors are ``{"error": ..., "message": ...}`` with a 4xx status that names the field; the SDKs
show the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .kernels import Context, Contexts, LanguageError

log = logging.getLogger("interpreter")


def problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "message": message, "code": status}, status_code=status)


async def body_of(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    return data


def optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value or None


class ExecutionStream:
    """NDJSON events of one execution (an ASGI response); stops the execution as soon as the
    client disconnects, even while the code prints nothing, so the SDK's ``timeout`` interrupts
    the kernel at once."""

    def __init__(self, events: AsyncGenerator[dict[str, Any], None]) -> None:
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")]})
        stream = asyncio.ensure_future(self._stream(send))
        gone = asyncio.ensure_future(self._disconnected(receive))
        try:
            await asyncio.wait({stream, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not stream.done():
                stream.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await stream
            gone.cancel()
            if stream.done() and not stream.cancelled() and stream.exception() is not None:
                log.error("execution stream failed", exc_info=stream.exception())

    async def _stream(self, send: Send) -> None:
        try:
            async for event in self.events:
                await send({"type": "http.response.body", "body": json.dumps(event).encode() + b"\n",
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.events.aclose()

    @staticmethod
    async def _disconnected(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


def make_app(contexts: Contexts | None = None) -> Starlette:
    ctxs = contexts or Contexts()

    async def health(_: Request) -> Response:
        return JSONResponse("ok")

    async def execute(request: Request) -> Response | ExecutionStream:
        try:
            body = await body_of(request)
            code = body.get("code")
            if not isinstance(code, str):
                raise ValueError("code is required and must be a string")
            context_id = optional_str(body, "context_id")
            language = optional_str(body, "language")
            env = body.get("env_vars") or {}
            if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
                raise ValueError("env_vars must be an object of string values")
            if context_id and language:
                raise ValueError("give context_id or language, not both")
        except ValueError as exc:
            return problem(400, str(exc))
        if context_id:
            ctx = ctxs.get(context_id)
            if ctx is None:
                return problem(404, f"context {context_id!r} not found")
        else:
            try:
                ctx = await ctxs.default(language)
            except LanguageError as exc:
                return problem(400, str(exc))
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot start is the client's answer
                log.exception("starting a %s kernel failed", language or "python")
                return problem(500, f"could not start the {language or 'python'} kernel: {type(exc).__name__}: {exc}")
        log.info("execute in context %s (%s): %d chars of code", ctx.id, ctx.language, len(code))
        return ExecutionStream(ctx.execute(code, env))

    async def create_context(request: Request) -> Response:
        try:
            body = await body_of(request)
            language = optional_str(body, "language")
            ctx = await ctxs.create(language, optional_str(body, "cwd"))
        except ValueError as exc:  # LanguageError too
            return problem(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot start is the client's answer
            log.exception("starting a kernel failed")
            return problem(500, f"could not start the {language or 'python'} kernel: {type(exc).__name__}: {exc}")
        return JSONResponse(ctx.to_json())

    async def list_contexts(_: Request) -> Response:
        return JSONResponse([c.to_json() for c in ctxs.by_id.values()])

    def find(request: Request) -> Context | Response:
        ctx_id = request.path_params["context_id"]
        return ctxs.get(ctx_id) or problem(404, f"context {ctx_id!r} not found")

    async def remove_context(request: Request) -> Response:
        ctx = find(request)
        if isinstance(ctx, Response):
            return ctx
        await ctxs.remove(ctx.id)
        return Response(status_code=204)

    async def restart_context(request: Request) -> Response:
        ctx = find(request)
        if isinstance(ctx, Response):
            return ctx
        await ctx.restart()
        return Response(status_code=204)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        # the default Python kernel starts with the server, so the first run_code finds it warm
        warm = asyncio.ensure_future(ctxs.default("python"))
        yield
        warm.cancel()
        await ctxs.close()

    return Starlette(routes=[
        Route("/health", health),
        Route("/execute", execute, methods=["POST"]),
        Route("/contexts", create_context, methods=["POST"]),
        Route("/contexts", list_contexts, methods=["GET"]),
        Route("/contexts/{context_id}", remove_context, methods=["DELETE"]),
        Route("/contexts/{context_id}/restart", restart_context, methods=["POST"]),
    ], lifespan=lifespan)
