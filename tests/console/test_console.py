"""The web console in a real headless browser (Debian's chromium through its chromedriver,
driven by Selenium): log in with an API key, see a sandbox with its state, template, age and
CPU/memory, follow its logs live, type into a terminal over envd's PTY, pause, resume, set its
timeout and kill it; templates with their builds and build logs. Screenshots of each screen are
saved next to the test's temp files and checked: the page rendered (not blank) and changed.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from sandboxd.testing.server import Server, running_server, sdk_pointed_at

pytestmark = pytest.mark.slow
WAIT_S = 30


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(data_dir, tmp_path_factory.mktemp("console") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, what: str, check):  # noqa: ANN001, ANN201 - a predicate of the driver
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(lambda d: check(d))
    except TimeoutException:
        page = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"timed out waiting for {what}; page text:\n{page}") from None


def png_pixels(png: bytes) -> tuple[int, int, bytes]:
    """Width, height and the decompressed (filtered) scanlines of a PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(png):
        size, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + size]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", data[:8])
        elif kind == b"IDAT":
            idat += data
        pos += 12 + size
    return width, height, zlib.decompress(idat)


def screenshot(driver: WebDriver, out: Path, name: str, element=None) -> bytes:  # noqa: ANN001
    """Save and check one screenshot: the right size, and not one flat colour."""
    png = (element or driver).screenshot_as_png if element is not None else driver.get_screenshot_as_png()
    (out / f"{name}.png").write_bytes(png)
    width, height, pixels = png_pixels(png)
    assert width > 100 and height > 50, (name, width, height)
    assert len(set(pixels)) > 16, f"screenshot {name} is blank"
    return png


def row(driver: WebDriver, sandbox_id: str):  # noqa: ANN201
    rows = driver.find_elements(By.CSS_SELECTOR, f'#sandboxes tr[data-id="{sandbox_id}"]')
    return rows[0] if rows else None


def cell(driver: WebDriver, sandbox_id: str, name: str) -> str:
    r = row(driver, sandbox_id)
    return r.find_element(By.CSS_SELECTOR, f"td.{name}").text if r is not None else ""


def test_console_click_through(server: Server, browser: WebDriver, tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    api = server.api()
    created = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 300})
    assert created.status_code == 201, created.text
    sandbox_id = created.json()["sandboxID"]
    try:
        click_through(server, browser, api, sandbox_id, shots)
    finally:
        api.delete(f"/sandboxes/{sandbox_id}")


def click_through(server: Server, browser: WebDriver, api: httpx.Client, sandbox_id: str, shots: Path) -> None:
    browser.get(f"{server.url}/console")  # redirects to /console/
    assert browser.current_url.endswith("/console/")
    key = browser.find_element(By.ID, "api-key")
    key.send_keys("e2b_not_a_key")
    browser.find_element(By.ID, "login-button").click()
    wait_for(browser, "the login error", lambda d: d.find_element(By.ID, "login-error").is_displayed())
    assert "not valid" in browser.find_element(By.ID, "login-error").text
    login_png = screenshot(browser, shots, "login-error")
    key.clear()
    key.send_keys(server.api_key)
    browser.find_element(By.ID, "login-button").click()

    # the sandbox with its state, template, age and CPU/memory from envd
    wait_for(browser, "the sandbox's row with metrics", lambda d: "MiB /" in cell(d, sandbox_id, "memory"))
    assert cell(browser, sandbox_id, "state") == "running" and cell(browser, sandbox_id, "template") == "base"
    assert cell(browser, sandbox_id, "age").endswith("s") and "%" in cell(browser, sandbox_id, "cpu")
    list_png = screenshot(browser, shots, "sandboxes")
    assert list_png != login_png

    # live logs: events that happen while the panel is open appear in it
    row(browser, sandbox_id).find_element(By.CSS_SELECTOR, "[data-action=logs]").click()
    wait_for(browser, "the creation event", lambda d: "Sandbox created from template base" in d.find_element(By.ID, "logs").text)
    assert api.post(f"/sandboxes/{sandbox_id}/pause", json={}).status_code == 204
    wait_for(browser, "the pause, live", lambda d: "Sandbox paused" in d.find_element(By.ID, "logs").text)
    wait_for(browser, "state paused", lambda d: cell(d, sandbox_id, "state") == "paused")
    screenshot(browser, shots, "paused-with-logs")
    row(browser, sandbox_id).find_element(By.CSS_SELECTOR, "[data-action=resume]").click()
    wait_for(browser, "state running after Resume", lambda d: cell(d, sandbox_id, "state") == "running")
    wait_for(browser, "the resume event", lambda d: "Sandbox resumed" in d.find_element(By.ID, "logs").text)

    # a terminal over envd's PTY: typed keys run in the sandbox, its output shows in xterm.js
    row(browser, sandbox_id).find_element(By.CSS_SELECTOR, "[data-action=terminal]").click()
    wait_for(browser, "a prompt", lambda d: "$" in d.find_element(By.CSS_SELECTOR, "#terminal .xterm-rows").text)
    term = browser.find_element(By.ID, "terminal")
    before = screenshot(browser, shots, "terminal-prompt", term)
    browser.find_element(By.CSS_SELECTOR, "#terminal .xterm-helper-textarea").send_keys(
        "echo console-$((6*7)) | tee /home/user/console.txt; tput cols\n")
    rows = (By.CSS_SELECTOR, "#terminal .xterm-rows")
    wait_for(browser, "the command's output", lambda d: "console-42" in d.find_element(*rows).text)
    after = screenshot(browser, shots, "terminal-output", term)
    assert after != before
    with sdk_pointed_at(server):
        from e2b import Sandbox

        sbx = Sandbox.connect(sandbox_id)
        assert sbx.files.read("/home/user/console.txt") == "console-42\n"
        cols = int(browser.find_element(*rows).text.split("console-42")[-1].split()[0])
        assert cols > 80  # the terminal was sized to its panel (fit addon), not a default 80

    # set the timeout from the page
    end_before = api.get(f"/sandboxes/{sandbox_id}").json()["endAt"]
    r = row(browser, sandbox_id)
    r.find_element(By.CSS_SELECTOR, "input[data-field=timeout]").send_keys("3600")
    r.find_element(By.CSS_SELECTOR, "[data-action=timeout]").click()
    wait_for(browser, "the new end time", lambda _: api.get(f"/sandboxes/{sandbox_id}").json()["endAt"] != end_before)
    end_after = datetime.fromisoformat(api.get(f"/sandboxes/{sandbox_id}").json()["endAt"].replace("Z", "+00:00"))
    assert (end_after - datetime.now(end_after.tzinfo)).total_seconds() > 3000

    # kill: the row goes away
    row(browser, sandbox_id).find_element(By.CSS_SELECTOR, "[data-action=kill]").click()
    wait_for(browser, "the row to go", lambda d: row(d, sandbox_id) is None)
    assert api.get(f"/sandboxes/{sandbox_id}").status_code == 404


def test_console_templates_and_build_logs(server: Server, browser: WebDriver, tmp_path: Path) -> None:
    with sdk_pointed_at(server):
        from e2b import Template

        with pytest.raises(Exception, match="exit"):
            Template.build(Template().from_template("base").run_cmd("echo console-build-output; exit 3"), "console-failed")
    browser.get(f"{server.url}/console/")
    if not browser.find_element(By.ID, "app").is_displayed():  # a fresh page keeps the key for the tab
        browser.find_element(By.ID, "api-key").send_keys(server.api_key)
        browser.find_element(By.ID, "login-button").click()
    browser.find_element(By.CSS_SELECTOR, '#tabs button[data-tab="templates"]').click()
    wait_for(browser, "the templates", lambda d: "console-failed" in d.find_element(By.ID, "templates").text)
    names = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#templates tbody tr")]
    assert any(t.startswith("base") and "ready" in t for t in names), names
    failed = next(r for r in browser.find_elements(By.CSS_SELECTOR, "#templates tbody tr") if "console-failed" in r.text)
    assert "error" in failed.text
    failed.click()
    wait_for(browser, "its builds", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#builds tbody tr")) == 1)
    browser.find_element(By.CSS_SELECTOR, "#builds tbody tr").click()
    wait_for(browser, "the build's log", lambda d: "console-build-output" in d.find_element(By.ID, "build-logs").text)
    assert "exit" in browser.find_element(By.ID, "build-logs").text
    screenshot(browser, tmp_path, "templates-build-logs")


def test_console_assets_are_served_locally(server: Server) -> None:
    """No CDN at run time: every script and stylesheet the page loads comes from this server."""
    page = httpx.get(f"{server.url}/console/", timeout=30).text
    for asset in ("vendor/xterm.js", "vendor/addon-fit.js", "vendor/xterm.css", "console.js", "console.css"):
        assert f'"{asset}"' in page
        r = httpx.get(f"{server.url}/console/{asset}", timeout=30)
        assert r.status_code == 200 and len(r.content) > 500, asset
    assert "http://" not in page and "https://" not in page
