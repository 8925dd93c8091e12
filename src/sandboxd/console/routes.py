"""Mount the console's static files on the API app (``/console`` redirects to ``/console/``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"


def mount_console(api: FastAPI) -> None:
    @api.get("/console", include_in_schema=False)
    def console_root() -> RedirectResponse:
        return RedirectResponse("/console/")

    api.mount("/console/", StaticFiles(directory=STATIC_DIR, html=True), name="console")
