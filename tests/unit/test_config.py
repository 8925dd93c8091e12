from __future__ import annotations

from pathlib import Path

from sandboxd.config import Settings


def test_env_then_overrides() -> None:
    s = Settings.from_env({"SANDBOXD_PORT": "4000", "SANDBOXD_DATA_DIR": "/x", "SANDBOXD_DOMAIN": "d.test",
                           "SANDBOXD_ENVD_READY_TIMEOUT_S": "2.5"}, net_prefix="abc", port=None)
    assert (s.port, s.data_dir, s.domain, s.envd_ready_timeout_s, s.net_prefix) == (4000, Path("/x"), "d.test", 2.5, "abc")
    assert s.db_url == "sqlite:////x/db.sqlite"
    assert Settings.from_env({}, port=5).port == 5
