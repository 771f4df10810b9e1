"""The worker's database retry: connection failures wait for the database, anything else fails at once."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from worker import db_retry
from worker.db_retry import is_connection_error, with_db_retry


def _down() -> OperationalError:
    return OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


def test_connection_errors_are_retried_until_the_database_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db_retry, "FIRST_PAUSE_S", 0.01)
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise _down()
        return "written"

    assert with_db_retry(flaky, time.monotonic() + 10, "write", max_pause_s=0.02) == "written"
    assert len(calls) == 4
    assert calls[2] - calls[1] >= 0.015  # backed off: 0.01, then 0.02 (the cap)


def test_other_errors_are_not_retried() -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise IntegrityError("INSERT", {}, ValueError("duplicate key"))

    with pytest.raises(IntegrityError):
        with_db_retry(broken, time.monotonic() + 10, "write")
    assert calls == [1]


def test_the_deadline_bounds_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db_retry, "FIRST_PAUSE_S", 0.05)
    t0 = time.monotonic()

    def down() -> None:
        raise _down()

    with pytest.raises(OperationalError):
        with_db_retry(down, t0 + 0.3, "write", max_pause_s=0.1)
    assert time.monotonic() - t0 < 1.0


def test_a_real_refused_connection_counts_as_the_database_being_down() -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/x", connect_args={"connect_timeout": 2})
    with pytest.raises(OperationalError) as caught, engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert is_connection_error(caught.value)
    assert not is_connection_error(ValueError("not a database error"))


def test_a_server_that_never_answers_counts_as_down_within_the_connect_timeout() -> None:
    import socket

    from store.db import make_engine

    with socket.socket() as server:  # accepts TCP (the kernel does) but never says a word: a hung database
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{server.getsockname()[1]}/x",
                             connect_timeout_s=1)
        t0 = time.monotonic()
        with pytest.raises(OperationalError) as caught, engine.connect():
            pass
        assert time.monotonic() - t0 < 10 and is_connection_error(caught.value)
        engine.dispose()
