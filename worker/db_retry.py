"""Database writes that outlast a short outage: a restarted or failing-over PostgreSQL must not fail a scan."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SqlPoolTimeout

log = logging.getLogger("antidote.worker")
T = TypeVar("T")
FIRST_PAUSE_S = 0.2


def is_connection_error(exc: BaseException) -> bool:
    """The database could not be reached or dropped the connection (as opposed to a bad query)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError | SqlPoolTimeout | psycopg.OperationalError
                      | psycopg.InterfaceError)


def with_db_retry(call: Callable[[], T], deadline: float, what: str, max_pause_s: float = 5.0) -> T:
    """``call()`` again with exponential backoff while the database is unreachable, until ``deadline``
    (``time.monotonic()``); other errors, and the last one past the deadline, propagate.

    ``call`` must open its own session, so that each try gets a fresh connection (the pool's pre-ping drops
    the dead ones)."""
    pause, tries = FIRST_PAUSE_S, 0
    while True:
        try:
            result = call()
        except Exception as exc:
            if not is_connection_error(exc) or time.monotonic() + pause > deadline:
                raise
            tries += 1
            if tries == 1 or tries % 10 == 0:
                log.warning("database unavailable while trying to %s; retrying", what,
                            extra={"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                                   "tries": tries})
            time.sleep(pause)
            pause = min(pause * 2, max_pause_s)
            continue
        if tries:
            log.info("database back after %d retries to %s", tries, what)
        return result
