"""A small ASGI app served by envd's own HTTP server (``sandboxd.envd.server.run``), for
tests/envd/test_server.py: ``python server_app.py PORT KEEP_ALIVE_S MARKER_FILE``.

Routes: ``/whoami`` (the client's address and HTTP version), ``/count`` (reads the body, answers
its size and the largest body message), ``/echo`` (streams each body message back at once),
``/hold`` (one chunk, then waits for ``http.disconnect`` and records it), ``/events`` (what was
recorded), ``/boom`` and ``/boom-late`` (raise before / after starting the response), ``/bad-header``
(a header h11 refuses to send). The
lifespan shutdown appends ``shutdown`` to MARKER_FILE.
"""

from __future__ import annotations

import asyncio
import json
import sys

from sandboxd.envd.server import run

EVENTS: list[str] = []


async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                with open(sys.argv[3], "a") as f:
                    f.write("shutdown\n")
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path == "/whoami":
        await _json(send, {"client": list(scope["client"]), "http_version": scope["http_version"],
                           "path": path, "query": scope["query_string"].decode()})
    elif path == "/count":
        if scope["query_string"] == b"slow":
            await asyncio.sleep(0.5)  # let the client fill every buffer first
        total, largest = 0, 0
        while True:
            message = await receive()
            assert message["type"] == "http.request", message
            total += len(message["body"])
            largest = max(largest, len(message["body"]))
            if not message["more_body"]:
                break
        await _json(send, {"total": total, "largest": largest})
    elif path == "/echo":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if message["body"]:
                await send({"type": "http.response.body", "body": message["body"], "more_body": True})
            if not message["more_body"]:
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    elif path == "/hold":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        EVENTS.append("hold: disconnect")
    elif path == "/events":
        await _json(send, EVENTS)
    elif path == "/boom":
        raise RuntimeError("boom before the response")
    elif path == "/bad-header":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-bad", b"a\r\nb")]})
    elif path == "/boom-late":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("boom mid-response")
    else:
        await _json(send, {"error": "not found"}, 404)


async def _json(send, obj: object, status: int = 200) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    run(app, "127.0.0.1", int(sys.argv[1]), keep_alive_s=float(sys.argv[2]))
