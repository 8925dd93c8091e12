"""``sandboxd template build`` on a terminal: a live progress display (rich) of the steps done and
the layers that came from the cache, with each step's output scrolling above it. Run under a real
pseudo-terminal (``script``), as a user's shell would run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_build_on_a_terminal_shows_live_progress(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text('FROM e2bdev/base\nRUN echo progress-test-$((6*7))\n')
    cli = Path(sys.executable).with_name("sandboxd")
    cmd = f"{cli} template build -n test-progress --data-dir {data_dir} {tmp_path}"
    p = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=600,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TERM": "xterm", "COLUMNS": "160"})
    screen = ANSI.sub("", p.stdout).replace("\r", "\n")
    assert p.returncode == 0, screen[-3000:]
    ran = "| progress-test-42" in screen
    assert ran or "RUN echo progress-test-$((6*7)): CACHED" in screen, screen[-3000:]
    total = int(re.search(r"\[\d+/(\d+)\] RUN echo progress-test", screen).group(1))
    bars = re.findall(r"steps [━╸ ]+ (\d+)/(\d+) (\d+) cached", screen)
    assert bars, screen[-3000:]
    assert len(bars) > 1  # redrawn while the build ran, not printed once at the end
    done, of, hits = map(int, bars[-1])
    assert (done, of) == (total, total)
    layers = re.search(r"\((\d+)/(\d+) layers from the cache\)", screen)
    assert layers and hits == int(layers.group(1)), screen[-3000:]
    assert re.search(r"^[0-9a-f]{32}$", screen, re.M)  # the build id, on stdout as without a terminal


def test_base_build_on_a_terminal_shows_live_progress(data_dir: Path) -> None:
    """``template build-base`` (and ``serve``'s first start, through the same code): a bar that ends
    at 100% (debootstrap's percentages on the way when the build is not cached yet)."""
    cli = Path(sys.executable).with_name("sandboxd")
    p = subprocess.run(["script", "-qec", f"{cli} template build-base --data-dir {data_dir}", "/dev/null"],
                       capture_output=True, text=True, timeout=900,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TERM": "xterm", "COLUMNS": "160"})
    screen = ANSI.sub("", p.stdout).replace("\r", "\n")
    assert p.returncode == 0, screen[-3000:]
    percents = [int(x) for x in re.findall(r"base template [━╸ ]+\s+(\d+)%", screen)]
    assert percents and percents[-1] == 100, screen[-3000:]
    assert percents == sorted(percents)  # it only moves forward
    if "debootstrap [" in screen:  # built now, not cached
        assert any(0 < x < 85 for x in percents), screen[-3000:]
    assert re.search(r"^[0-9a-f]{32}$", screen, re.M)
