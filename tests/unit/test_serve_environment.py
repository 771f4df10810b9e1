"""``antidote serve --workers N`` hands its settings to uvicorn's worker processes through the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli.serve import serve, settings_environment
from store.settings import Settings


def test_the_environment_rebuilds_the_same_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://u@127.0.0.1:5/db",
                        broker_url="redis://127.0.0.1:6379/3", key_cache_s=7.5, log_json=False,
                        max_upload_bytes=12345, read_pool_size=3)
    env = settings_environment(settings)
    assert env["ANTIDOTE_LOG_JSON"] == "false" and "ANTIDOTE_STORAGE_URL" not in env  # unset stays unset
    for name in list(os.environ):
        if name.startswith("ANTIDOTE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings


def test_zero_workers_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--workers"):
        serve(Settings(data_dir=tmp_path), "127.0.0.1", 0, workers=0)
