"""The released ``e2b-code-interpreter`` (Python) through the domain mode: ``Sandbox.create()``
starts ``code-interpreter-v1`` (the server builds it in the background; while it builds, the
create is a 503 the SDK retries, so this waits), then state, streaming, a chart, a JavaScript
context, kill.

Prints one line per step; exits non-zero at the first failure.
"""

from __future__ import annotations

import sys
import time
from importlib.metadata import version

from e2b import exceptions
from e2b_code_interpreter import Sandbox

#: what a 503 raises: ServiceBusyException in newer SDKs, SandboxException in older ones
BUSY: tuple[type[Exception], ...] = tuple(
    e for e in (getattr(exceptions, "ServiceBusyException", None), exceptions.SandboxException) if e is not None)

BUILD_WAIT_S = 1800


def step(name: str) -> None:
    print(f"[e2b-code-interpreter {version('e2b-code-interpreter')}] {name}", flush=True)


def create() -> Sandbox:
    deadline = time.monotonic() + BUILD_WAIT_S
    while True:
        try:
            return Sandbox.create(timeout=300)
        except BUSY as exc:
            if "still being built" not in str(exc) or time.monotonic() > deadline:
                raise  # only code-interpreter-v1 still being built (a 503) is waited for
            print(f"    waiting: {exc}", flush=True)
            time.sleep(10)


def main() -> None:
    step("create")
    sbx = create()
    try:
        step("run_code keeps state")
        sbx.run_code("x = 41")
        assert sbx.run_code("x + 1").text == "42"
        step("stdout streams to the callback")
        lines: list[str] = []
        ex = sbx.run_code("print('hello'); print('world')", on_stdout=lambda m: lines.append(m.line))
        assert "".join(lines) == "hello\nworld\n", lines
        step("a matplotlib chart")
        ex = sbx.run_code("import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [1, 2])\nplt.show()")
        assert ex.results[0].png and ex.results[0].chart.type == "bar", ex
        step("a javascript context")
        ctx = sbx.create_code_context(language="javascript")
        assert sbx.run_code("[1, 2].map(x => x * 3)", context=ctx).text == "[ 3, 6 ]"
        step("an error")
        ex = sbx.run_code("raise ValueError('nope')")
        assert ex.error is not None and (ex.error.name, ex.error.value) == ("ValueError", "nope"), ex.error
    finally:
        step("kill")
        sbx.kill()
    step("ok")


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 - the traceback is the scenario's report
        import traceback

        traceback.print_exc()
        sys.exit(1)
