"""The OOM guard's parts on the real /proc, and one real kill — of a child this test started
(``protected`` is every other process on the host, so nothing else can be chosen)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from sandboxd.envd.oom_guard import OomGuard, Victim, biggest_process, meminfo, only_these_run, poll_interval

HOG_MB = 200


def _all_pids() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def test_meminfo_reads_the_totals_also_again_from_one_open_file() -> None:
    total, available = meminfo()
    assert 0 < available <= total
    fd = os.open("/proc/meminfo", os.O_RDONLY)
    try:
        assert meminfo(fd)[0] == meminfo(fd)[0] == total
    finally:
        os.close(fd)


def test_the_less_is_left_the_more_often_it_looks() -> None:
    assert poll_interval(0) == 0.01 and poll_interval(64 << 20) < poll_interval(512 << 20) <= 0.5


def test_the_biggest_process_is_found_and_killed_with_its_session() -> None:
    hog = subprocess.Popen([sys.executable, "-c", f"b = bytearray({HOG_MB} << 20)\nimport time; time.sleep(60)"],
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while (found := biggest_process(_all_pids() - {hog.pid})) is None or found[1] < HOG_MB << 20:
            assert time.monotonic() < deadline, f"the hog never reached {HOG_MB} MiB: {found}"
            time.sleep(0.05)
        pid, _rss, session, name = found
        assert (pid, session) == (hog.pid, hog.pid) and name.startswith("python")
        kills: list[Victim] = []
        guard = OomGuard(kills.append, protected=_all_pids() - {hog.pid})
        victim = guard.check(total=meminfo()[0])
        assert victim is not None and victim.pid == hog.pid and victim.rss_bytes >= HOG_MB << 20
        assert kills == [victim] and guard.kills == 1
        assert hog.wait(10) == -signal.SIGKILL
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.wait()



def test_an_idle_sandbox_is_looked_at_seldom_and_at_once_when_a_process_starts() -> None:
    """Idle (nothing runs but the protected): a look every 2 s, not ten a second (each wake-up is
    host CPU under gVisor); ``wake()`` (envd calls it before every spawn) looks at once, and a
    running process keeps it looking often."""
    assert only_these_run(_all_pids() | {os.getpid()})
    assert not only_these_run({1})
    guard = OomGuard(lambda v: None, protected=_all_pids() | {os.getpid()}).start()
    try:
        time.sleep(1.0)
        assert guard.rounds <= 2, guard.rounds
        before = guard.rounds
        guard.wake()
        time.sleep(0.1)
        assert guard.rounds > before
        guard.protected = {1}  # now everything else on the host counts as a running process
        guard.wake()
        before = guard.rounds
        time.sleep(1.5)
        assert guard.rounds - before >= 3, guard.rounds - before  # every <= 0.5 s while busy
    finally:
        guard.stop()
