"""Contexts: one Jupyter kernel each, and one execution at a time in each.

An execution is turned into the events the ``e2b-code-interpreter`` SDKs parse, one JSON object a
line: ``stdout``/``stderr`` while the code runs, ``result`` for every ``display_data`` and the
``execute_result`` (``is_main_result``), ``error`` and ``number_of_executions``. A client that goes
away mid-run (the SDK's ``timeout``) interrupts the kernel, so the context is free again and keeps
its state. A kernel that dies mid-run is reported as an error and started again on the next run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.manager import AsyncKernelManager

log = logging.getLogger("interpreter")

DEFAULT_CWD = os.path.expanduser("~")  # the sandbox user's home, as on E2B
#: language → Jupyter kernel name (kernel specs installed by the template's recipe)
KERNELS = {"python": "python3", "javascript": "deno", "typescript": "deno", "bash": "bash"}
ALIASES = {"js": "javascript", "ts": "typescript", "py": "python", "python3": "python", "sh": "bash"}
#: Jupyter mime type → the SDK's Result field; anything else goes to ``extra``
MIME_FIELDS = {
    "text/plain": "text", "text/html": "html", "text/markdown": "markdown", "image/svg+xml": "svg",
    "image/png": "png", "image/jpeg": "jpeg", "application/pdf": "pdf", "text/latex": "latex",
    "application/json": "json", "application/javascript": "javascript", "e2b/chart": "chart",
    "e2b/data": "data",
}
#: the IPython extension (installed by the recipe) that adds E2B's chart data to figures
DISPLAY_EXTENSION = "sandboxd_display"
START_TIMEOUT_S = 60
POLL_S = 0.5  # how often a silent execution checks that its kernel is still alive


class LanguageError(ValueError):
    """A language no kernel here speaks."""


def kernel_name(language: str | None) -> tuple[str, str]:
    """(language as the SDK names it, kernel name); raise :class:`LanguageError`."""
    lang = (language or "python").strip().lower()
    lang = ALIASES.get(lang, lang)
    if lang not in KERNELS:
        raise LanguageError(f"language {language!r} is not supported here (supported: {', '.join(KERNELS)})")
    return lang, KERNELS[lang]


def now_ns() -> int:
    return time.time_ns()


def result_event(content: dict[str, Any], main: bool) -> dict[str, Any]:
    """A Jupyter ``data`` bundle as the SDK's ``Result``: known mime types by name, others in ``extra``."""
    event: dict[str, Any] = {"type": "result", "is_main_result": main}
    extra = {}
    for mime, value in content.get("data", {}).items():
        name = MIME_FIELDS.get(mime)
        if name is None:
            extra[mime] = value
        else:
            event[name] = value
    text = event.get("text")
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] == "'":
        event["text"] = text[1:-1]  # as E2B does: run_code("'a'").text is a, not 'a'
    if extra:
        event["extra"] = extra
    return event


def error_event(name: str, value: str, traceback: list[str] | str) -> dict[str, Any]:
    tb = traceback if isinstance(traceback, str) else "\n".join(traceback)
    return {"type": "error", "name": name, "value": value, "traceback": tb}


def env_code(language: str, env: dict[str, str], saved: str = "__sandboxd_saved_env") -> tuple[str, str]:
    """Code that sets ``env`` in the kernel, and code that puts the old values back."""
    if language == "python":
        keys = json.dumps(sorted(env))
        set_code = (f"import os as __sandboxd_os\n{saved} = {{k: __sandboxd_os.environ.get(k) for k in {keys}}}\n"
                    f"__sandboxd_os.environ.update({json.dumps(env)})")
        restore = (f"for __k, __v in {saved}.items():\n"
                   "    (__sandboxd_os.environ.pop(__k, None) if __v is None else __sandboxd_os.environ.__setitem__(__k, __v))\n"
                   f"del {saved}, __sandboxd_os")
        return set_code, restore
    if language == "bash":
        def q(s: str) -> str:
            return "'" + s.replace("'", "'\\''") + "'"
        set_code = "\n".join(f"{saved}_{i}=${{{k}-__unset__}}; export {k}={q(v)}" for i, (k, v) in enumerate(env.items()))
        restore = "\n".join(f'if [ "${saved}_{i}" = __unset__ ]; then unset {k}; else export {k}="${saved}_{i}"; fi; '
                            f"unset {saved}_{i}" for i, k in enumerate(env))
        return set_code, restore
    pairs = json.dumps(env)  # deno (javascript / typescript)
    set_code = (f"globalThis.{saved} = Object.fromEntries(Object.keys({pairs}).map(k => [k, Deno.env.get(k)]));"
                f"for (const [k, v] of Object.entries({pairs})) Deno.env.set(k, v);")
    restore = (f"for (const [k, v] of Object.entries(globalThis.{saved})) "
               f"{{ if (v === undefined) Deno.env.delete(k); else Deno.env.set(k, v); }} delete globalThis.{saved};")
    return set_code, restore


@dataclass
class Context:
    """One kernel, its language and working directory."""

    id: str
    language: str
    cwd: str
    kernel: str
    manager: AsyncKernelManager | None = None
    client: Any = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    died: str | None = None  # why the kernel died, until it is started again

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    async def start(self) -> None:
        started = time.monotonic()
        os.makedirs(self.cwd, exist_ok=True)
        self.manager = AsyncKernelManager(kernel_name=self.kernel)
        extra = [f"--InteractiveShellApp.extensions={DISPLAY_EXTENSION}"] if self.language == "python" else []
        env = dict(os.environ)
        if self.kernel == "deno":
            env["NO_COLOR"] = "1"  # Deno colours its values' text/plain, which would reach .text
        await self.manager.start_kernel(cwd=self.cwd, env=env, extra_arguments=extra)
        self.client = self.manager.client()
        self.client.start_channels()
        await self.client.wait_for_ready(timeout=START_TIMEOUT_S)
        self.died = None
        log.info("context %s: %s kernel ready in %.2fs (cwd %s)", self.id, self.language,
                 time.monotonic() - started, self.cwd)

    async def stop(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
            self.client = None
        if self.manager is not None:
            try:
                await self.manager.shutdown_kernel(now=True)
            except Exception:  # noqa: BLE001 - a dead kernel may not shut down cleanly
                log.exception("context %s: shutting the kernel down failed", self.id)
            self.manager = None

    async def restart(self) -> None:
        async with self.lock:
            await self.stop()
            await self.start()

    async def alive(self) -> bool:
        return self.manager is not None and bool(await self.manager.is_alive())

    # -- execution --------------------------------------------------------------------------

    async def execute(self, code: str, env: dict[str, str] | None) -> AsyncGenerator[dict[str, Any], None]:
        """Run ``code`` (with ``env`` set for this run only) and yield its events."""
        async with self.lock:
            if self.died is not None or not await self.alive():
                log.info("context %s: starting its kernel again (%s)", self.id, self.died or "not running")
                await self.stop()
                await self.start()
            restore = None
            if env:
                set_code, restore = env_code(self.language, env)
                await self._silent(set_code)
            try:
                async for event in self._run(code):
                    yield event
            finally:
                if restore is not None and self.died is None:
                    await asyncio.shield(self._silent(restore))

    async def _silent(self, code: str) -> None:
        msg_id = self.client.execute(code, silent=True, store_history=False)
        await self._wait_reply(msg_id)

    async def _wait_reply(self, msg_id: str) -> dict[str, Any] | None:
        while True:
            try:
                msg = await self.client.get_shell_msg(timeout=POLL_S)
            except queue.Empty:
                if not await self.alive():
                    return None
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    async def _run(self, code: str) -> AsyncIterator[dict[str, Any]]:
        msg_id = self.client.execute(code, store_history=True, allow_stdin=False)
        done = False
        try:
            while True:
                try:
                    msg = await self.client.get_iopub_msg(timeout=POLL_S)
                except queue.Empty:
                    if not await self.alive():
                        self.died = "the kernel died while running code"
                        log.warning("context %s: %s", self.id, self.died)
                        yield error_event("DeadKernelError", "The kernel died while running this code "
                                          "(for example os._exit() or out of memory); its state is lost. "
                                          "It starts again on the next run, or restart the context.", "")
                        done = True
                        return
                    continue
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    yield {"type": content["name"], "text": content["text"], "timestamp": now_ns()}
                elif kind in ("display_data", "execute_result"):
                    yield result_event(content, kind == "execute_result")
                elif kind == "error":
                    yield error_event(content["ename"], content["evalue"], content["traceback"])
                elif kind == "execute_input":
                    yield {"type": "number_of_executions", "execution_count": content["execution_count"]}
                elif kind == "status" and content["execution_state"] == "idle":
                    done = True
                    break
            await self._wait_reply(msg_id)
        finally:
            if not done:  # the client went away (its timeout): stop the code, keep the kernel
                log.info("context %s: the client left mid-run; interrupting the kernel", self.id)
                await asyncio.shield(self._interrupt(msg_id))

    async def _interrupt(self, msg_id: str) -> None:
        assert self.manager is not None
        await self.manager.interrupt_kernel()
        await self._wait_reply(msg_id)
        # drain this execution's iopub messages so the next run starts clean
        while True:
            try:
                await self.client.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                return


class Contexts:
    """Every context of this sandbox; a default one per language, made on first use."""

    def __init__(self) -> None:
        self.by_id: dict[str, Context] = {}
        self.defaults: dict[str, str] = {}  # language → context id
        self._guard = asyncio.Lock()

    async def create(self, language: str | None, cwd: str | None) -> Context:
        lang, kernel = kernel_name(language)
        ctx = Context(id=str(uuid.uuid4()), language=lang, cwd=cwd or DEFAULT_CWD, kernel=kernel)
        await ctx.start()
        self.by_id[ctx.id] = ctx
        return ctx

    async def default(self, language: str | None) -> Context:
        lang, _ = kernel_name(language)
        async with self._guard:
            ctx_id = self.defaults.get(lang)
            if ctx_id is None or ctx_id not in self.by_id:
                ctx = await self.create(lang, None)
                self.defaults[lang] = ctx.id
                return ctx
            return self.by_id[ctx_id]

    def get(self, ctx_id: str) -> Context | None:
        return self.by_id.get(ctx_id)

    async def remove(self, ctx_id: str) -> bool:
        ctx = self.by_id.pop(ctx_id, None)
        if ctx is None:
            return False
        self.defaults = {k: v for k, v in self.defaults.items() if v != ctx_id}
        async with ctx.lock:
            await ctx.stop()
        return True

    async def close(self) -> None:
        for ctx in list(self.by_id.values()):
            await ctx.stop()
        self.by_id.clear()
