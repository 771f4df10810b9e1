"""A running scan's sign of life: its row's ``updated_at`` is touched every few seconds while the scan runs,
so that a silent running scan means a dead worker (``api.recovery`` sends such a scan again when the broker
lost its task too)."""

from __future__ import annotations

import logging
import threading

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from store.models import Scan, ScanStatus, utcnow

log = logging.getLogger("antidote.worker")


class Heartbeat:
    """A daemon thread for the duration of a ``with`` block; a failed beat (database down) is only logged."""

    def __init__(self, sessions: sessionmaker[Session], scan_id: str, interval_s: float) -> None:
        self.sessions, self.scan_id, self.interval_s = sessions, scan_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"heartbeat-{scan_id[:8]}")

    def __enter__(self) -> Heartbeat:
        if self.interval_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self.sessions() as session:
                    session.execute(update(Scan).where(Scan.id == self.scan_id,
                                                       Scan.status == ScanStatus.running.value)
                                    .values(updated_at=utcnow()))
                    session.commit()
            except Exception as exc:  # noqa: BLE001 - a missed beat only delays nothing; the scan goes on
                log.warning("heartbeat not recorded", extra={"scan_id": self.scan_id, "error": type(exc).__name__})
