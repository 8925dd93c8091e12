"""The real ``e2b-code-interpreter`` SDK from PyPI (sync and async) against ``code-interpreter-v1``,
which the server builds in the background after ``base`` exactly as ``serve`` does.

One server and one sandbox for most of the module: the template is built once (content-addressed,
shared test data dir), and every test uses its own context or variables where state matters.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandboxd.interpreter.template import NAME
from sandboxd.store.db import Database
from sandboxd.store.templates_db import TemplateBuilds
from sandboxd.testing.server import Server, running_server, sdk_pointed_at

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
BUILD_TIMEOUT_S = 2100  # a cold build installs numpy, pandas, matplotlib, scipy, deno... from PyPI


def _wait_built(server: Server) -> None:
    builds = TemplateBuilds(Database(server.settings.db_url))
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while time.monotonic() < deadline:
        row = builds.latest(NAME)
        if row is not None and row.status == "ready":
            return
        if row is not None and row.status == "error":
            logs = "\n".join(e.message for e in builds.logs(row.build_id, 0, 100000)[-60:])
            pytest.fail(f"{NAME} failed to build: {row.reason}\n{logs}")
        time.sleep(2)
    pytest.fail(f"{NAME} was not built within {BUILD_TIMEOUT_S}s")


@pytest.fixture(scope="module")
def ci_server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("ci-server") / "server.log"
    try:
        with running_server(data_dir, log_path, builtin_templates=NAME) as srv, sdk_pointed_at(srv):
            _wait_built(srv)
            yield srv
    finally:
        if log_path.exists():
            print(f"--- server log tail ---\n{log_path.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="module")
def sbx(ci_server: Server) -> Iterator[Any]:
    from e2b_code_interpreter import Sandbox

    sandbox = Sandbox.create(timeout=900)  # the SDK's default template: code-interpreter-v1
    try:
        yield sandbox
    finally:
        sandbox.kill()


# -- Python: state, streaming, results, errors ------------------------------------------------


def test_state_is_kept_between_runs_and_execution_count_grows(sbx: Any) -> None:
    first = sbx.run_code("counter = 41")
    second = sbx.run_code("counter += 1; counter")
    assert second.error is None, second.error
    assert second.text == "42"
    assert second.results[0].is_main_result
    assert second.execution_count == first.execution_count + 1


def test_stdout_reaches_the_callback_while_the_code_still_runs(sbx: Any) -> None:
    """The code prints, then waits for a file that only the on_stdout callback writes: it can only
    finish if the first line was delivered before the run ended."""
    seen: list[str] = []
    errs: list[str] = []

    def on_stdout(msg: Any) -> None:
        seen.append(msg.line)
        if "waiting" in msg.line:
            sbx.files.write("/tmp/go-on", "1")

    code = ("import os, sys, time\nprint('waiting', flush=True)\nt = time.time()\n"
            "while not os.path.exists('/tmp/go-on') and time.time() - t < 60: time.sleep(0.05)\n"
            "print('released' if os.path.exists('/tmp/go-on') else 'nobody answered')\n"
            "print('to stderr', file=sys.stderr)")
    ex = sbx.run_code(code, on_stdout=on_stdout, on_stderr=lambda m: errs.append(m.line))
    assert ex.error is None, ex.error
    assert "".join(seen) == "waiting\nreleased\n"
    assert ex.logs.stdout == seen
    assert errs == ["to stderr\n"] and ex.logs.stderr == errs


def test_every_mime_type_comes_back_in_its_field(sbx: Any) -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    code = f"""
class Everything:
    def _repr_mimebundle_(self, include=None, exclude=None):
        return {{"text/plain": "everything", "text/html": "<b>html</b>", "text/markdown": "**md**",
                "image/svg+xml": "<svg></svg>", "image/png": "{png}", "image/jpeg": "{png}",
                "application/pdf": "JVBERi0=", "text/latex": "$x^2$", "application/json": {{"a": 1}},
                "application/javascript": "console.log(1)", "application/x-custom": "custom"}}
Everything()
"""
    ex = sbx.run_code(code)
    assert ex.error is None, ex.error
    [r] = ex.results
    assert r.is_main_result
    assert (r.text, r.html, r.markdown, r.svg, r.png, r.jpeg, r.pdf, r.latex, r.json, r.javascript) == (
        "everything", "<b>html</b>", "**md**", "<svg></svg>", png, png, "JVBERi0=", "$x^2$", {"a": 1},
        "console.log(1)")
    assert r.extra == {"application/x-custom": "custom"}


def test_display_gives_several_results_and_the_last_expression_is_the_main_one(sbx: Any) -> None:
    got: list[Any] = []
    ex = sbx.run_code("from IPython.display import display, HTML, Markdown\n"
                      "display(HTML('<i>one</i>'))\ndisplay(Markdown('two'))\n'three'", on_result=got.append)
    assert ex.error is None, ex.error
    assert [(r.html, r.markdown, r.text, r.is_main_result) for r in ex.results] == [
        ("<i>one</i>", None, "<IPython.core.display.HTML object>", False),
        (None, "two", "<IPython.core.display.Markdown object>", False),
        (None, None, "three", True)]
    assert got == ex.results


def test_an_exception_is_an_error_with_name_value_and_traceback(sbx: Any) -> None:
    errors: list[Any] = []
    ex = sbx.run_code("def f():\n    return 1 / 0\nf()", on_error=errors.append)
    assert ex.error is not None and errors == [ex.error]
    assert (ex.error.name, ex.error.value) == ("ZeroDivisionError", "division by zero")
    plain = re.sub(r"\x1b\[[0-9;]*m", "", ex.error.traceback)  # IPython colours it, as on E2B
    assert "return 1 / 0" in plain and "ZeroDivisionError" in plain
    assert ex.results == []


def test_envs_hold_for_one_run_only(sbx: Any) -> None:
    ex = sbx.run_code("import os; os.environ.get('CI_VAR', 'unset')", envs={"CI_VAR": "for this run"})
    assert ex.text == "for this run"
    assert sbx.run_code("import os; os.environ.get('CI_VAR', 'unset')").text == "unset"


def test_a_timeout_interrupts_the_kernel_and_the_context_keeps_its_state(sbx: Any) -> None:
    from e2b import TimeoutException

    sbx.run_code("kept = 'still here'")
    with pytest.raises(TimeoutException, match="Execution timed out"):
        sbx.run_code("import time\nfor _ in range(600): time.sleep(0.1)\nkept = 'overwritten'", timeout=3)
    after = sbx.run_code("kept")
    assert after.error is None, after.error
    assert after.text == "still here"


def test_dataframes_render_as_html_and_text(sbx: Any) -> None:
    ex = sbx.run_code("import pandas as pd\npd.DataFrame({'city': ['Oslo', 'Lima'], 'pop': [0.7, 10.0]})")
    assert ex.error is None, ex.error
    [r] = ex.results
    assert "<table" in r.html and "Oslo" in r.html
    assert "city" in r.text and "Lima" in r.text


# -- charts -----------------------------------------------------------------------------------

CHARTS = {
    "line": "plt.plot([1, 2, 3], [1, 4, 9], label='squares')\nplt.title('Line'); plt.xlabel('x (s)'); plt.ylabel('y')",
    "scatter": "plt.scatter([1, 2, 3], [3, 1, 2], label='dots')\nplt.title('Scatter')",
    "bar": "plt.bar(['a', 'b', 'c'], [3, 5, 7], label='bars')\nplt.title('Bar')",
    "pie": "plt.pie([1, 2, 3], labels=['x', 'y', 'z'])\nplt.title('Pie')",
    "box_and_whisker": ("plt.boxplot([[1, 2, 3, 4, 5], [2, 4, 6, 8, 10]], tick_labels=['A', 'B'], patch_artist=True)\n"
                        "plt.title('Box')"),
}


@pytest.mark.parametrize("kind", CHARTS)
def test_a_matplotlib_figure_comes_back_as_png_and_chart_data(sbx: Any, kind: str) -> None:
    from e2b_code_interpreter.charts import ChartType

    ex = sbx.run_code("import matplotlib.pyplot as plt\nplt.figure()\n" + CHARTS[kind] + "\nplt.show()")
    assert ex.error is None, ex.error
    [r] = ex.results
    assert base64.b64decode(r.png).startswith(b"\x89PNG")
    assert r.chart is not None, r.formats()
    assert r.chart.type == ChartType(kind)
    assert r.chart.title == kind.split("_")[0].capitalize()
    if kind == "line":
        [line] = r.chart.elements
        assert line.label == "squares" and line.points == [(1, 1), (2, 4), (3, 9)]
        assert (r.chart.x_label, r.chart.x_unit, r.chart.y_label) == ("x (s)", "s", "y")
    elif kind == "scatter":
        assert [(p[0], p[1]) for p in r.chart.elements[0].points] == [(1, 3), (2, 1), (3, 2)]
    elif kind == "bar":
        assert [(b.label, b.value) for b in r.chart.elements] == [("a", 3), ("b", 5), ("c", 7)]
    elif kind == "pie":
        assert [e.label for e in r.chart.elements] == ["x", "y", "z"]
    else:
        assert [(e.label, e.median) for e in r.chart.elements] == [("A", 3), ("B", 6)]


def test_several_axes_are_a_superchart(sbx: Any) -> None:
    from e2b_code_interpreter.charts import ChartType

    ex = sbx.run_code("import matplotlib.pyplot as plt\nfig, (a, b) = plt.subplots(1, 2)\n"
                      "a.plot([1, 2], [2, 1]); b.bar(['p', 'q'], [1, 2]); fig.suptitle('Both')\nplt.show()")
    [r] = ex.results
    assert r.chart.type == ChartType.SUPERCHART and r.chart.title == "Both"
    assert [c.type for c in r.chart.elements] == [ChartType.LINE, ChartType.BAR]


# -- contexts and languages ---------------------------------------------------------------------


def test_contexts_have_their_own_state_cwd_and_can_be_restarted_and_removed(sbx: Any) -> None:
    ctx = sbx.create_code_context(cwd="/tmp")
    assert (ctx.language, ctx.cwd) == ("python", "/tmp")
    assert sbx.run_code("import os; os.getcwd()", context=ctx).text == "/tmp"
    sbx.run_code("mine = 1", context=ctx)
    assert sbx.run_code("'mine' in globals()").text == "False"  # the default context is another kernel
    assert ctx.id in [c.id for c in sbx.list_code_contexts()]
    sbx.restart_code_context(ctx)
    assert sbx.run_code("'mine' in globals()", context=ctx).text == "False"
    sbx.remove_code_context(ctx.id)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]


def test_bash_javascript_and_typescript_run_in_their_kernels(sbx: Any) -> None:
    bash = sbx.run_code("echo $((6 * 7)) && echo $MY_VAR", language="bash", envs={"MY_VAR": "from envs"})
    assert bash.error is None, bash.error
    assert "".join(bash.logs.stdout) == "42\nfrom envs\n"
    js = sbx.run_code("const xs = [1, 2, 3];\nxs.map(x => x * 2)", language="javascript")
    assert js.error is None, js.error
    assert js.text == "[ 2, 4, 6 ]"
    ts_ctx = sbx.create_code_context(language="typescript")
    ts = sbx.run_code("function add(a: number, b: number): number { return a + b }\nadd(2, 3)", context=ts_ctx)
    assert ts.error is None, ts.error
    assert ts.text == "5"
    assert sbx.run_code("add(4, 4)", context=ts_ctx).text == "8"


def test_an_unknown_language_is_a_clear_error(sbx: Any) -> None:
    from e2b import SandboxException

    with pytest.raises(SandboxException, match="language 'cobol' is not supported"):
        sbx.run_code("DISPLAY 'hi'", language="cobol")
    with pytest.raises(SandboxException, match="language 'cobol' is not supported"):
        sbx.create_code_context(language="cobol")


def test_a_dead_kernel_is_an_error_and_the_context_restarts(sbx: Any) -> None:
    ctx = sbx.create_code_context()
    ex = sbx.run_code("import os; os._exit(1)", context=ctx)
    assert ex.error is not None and ex.error.name == "DeadKernelError", ex.error
    sbx.restart_code_context(ctx)
    assert sbx.run_code("1 + 1", context=ctx).text == "2"


def test_the_server_s_output_is_in_the_sandbox_log(sbx: Any, ci_server: Server) -> None:
    sbx.run_code("'logged'")
    with ci_server.api() as api:
        logs = api.get(f"/v2/sandboxes/{sbx.sandbox_id}/logs").json()
    text = "\n".join(e.get("message", "") for e in logs.get("logs", []))
    assert "execute in context" in text, text[-2000:]


# -- the async SDK --------------------------------------------------------------------------------


def test_the_async_sdk_runs_code_with_callbacks(ci_server: Server) -> None:
    from e2b_code_interpreter import AsyncSandbox

    async def scenario() -> tuple[str | None, list[str]]:
        sandbox = await AsyncSandbox.create(timeout=300)
        try:
            lines: list[str] = []
            await sandbox.run_code("x = 20")
            ex = await sandbox.run_code("print('hi'); x + 1", on_stdout=lambda m: lines.append(m.line))
            return ex.text, lines
        finally:
            await sandbox.kill()

    assert asyncio.run(scenario()) == ("21", ["hi\n"])


# -- a template that is not ready yet -------------------------------------------------------------


def test_a_template_still_building_is_a_503_that_says_how_far_it_got(ci_server: Server) -> None:
    """What a create of code-interpreter-v1 gets during a cold ``serve``'s background build
    (recorded here as such a build's rows, since the real one is done by now)."""
    from e2b import Sandbox
    from e2b.exceptions import ServiceBusyException

    builds = TemplateBuilds(Database(ci_server.settings.db_url))
    row = builds.new_build("still-building", ["default"])
    builds.set_status(row.build_id, "building")
    builds.add_log(row.build_id, "info", "[2/7] RUN pip install numpy pandas", "2")
    with pytest.raises(ServiceBusyException, match=r"template 'still-building' is still being built "
                                                   r"\(at \[2/7\] RUN pip install numpy pandas, \d+s so far\)"):
        Sandbox.create("still-building", retries=0)
    with ci_server.api() as api:
        r = api.post("/v2/sandboxes", json={"templateID": "still-building"})
    assert r.status_code == 503 and r.headers["retry-after"] == "10", r.text
    assert r.json()["code"] == 503

    builds.set_status(row.build_id, "error", reason="step 2 failed: no space left on device", step="2")
    with ci_server.api() as api:
        r = api.post("/v2/sandboxes", json={"templateID": "still-building"})
    assert r.status_code == 500 and "failed to build" in r.json()["message"], r.text
    assert "no space left on device" in r.json()["message"]


# -- the JS SDK -----------------------------------------------------------------------------------

JS_VERSION = "2.8.0"  # @e2b/code-interpreter, the newest on npm


def test_the_js_sdk_runs_code_charts_and_contexts(ci_server: Server, data_dir: Path) -> None:
    import os
    import shutil
    import subprocess

    from sandboxd.testing.sdk_envs import node_env, path_with_node

    root = node_env(data_dir / "sdk-envs", "@e2b/code-interpreter", JS_VERSION)
    script = root / f"ci-{os.getpid()}.mjs"  # beside node_modules, so the import finds this release
    shutil.copyfile(Path(__file__).parent / "scenarios" / "js_code_interpreter.mjs", script)
    env = {"PATH": path_with_node(data_dir / "sdk-envs"), "HOME": os.environ.get("HOME", "/root"),
           "E2B_API_KEY": ci_server.api_key, "E2B_API_URL": ci_server.url, "E2B_SANDBOX_URL": ci_server.url}
    try:
        p = subprocess.run(["node", str(script)], env=env, capture_output=True, text=True, timeout=300)
    finally:
        script.unlink()
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr
