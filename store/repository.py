"""Every query the API and the worker make; each one scoped to a tenant where a client is behind it."""

from __future__ import annotations

import base64
import hashlib
import secrets
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from store.models import TERMINAL_STATUSES, ApiKey, Scan, ScanStatus, Tenant, as_utc, utcnow

KEY_PREFIX = "adk_"


def new_id() -> str:
    return str(uuid.uuid4())


def is_scan_id(scan_id: str) -> bool:
    """True for an id of the shape :func:`new_id` makes (a canonical UUID string). Any other string names no
    scan, and is not sent to the database: PostgreSQL refuses a NUL character in a text parameter with an
    error that would otherwise be a 500 instead of the 404 of a scan that does not exist."""
    try:
        return len(scan_id) == 36 and str(uuid.UUID(scan_id)) == scan_id
    except ValueError:
        return False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# --- tenants and keys -------------------------------------------------------------------------------------


def create_api_key(session: Session, tenant_name: str) -> str:
    """Create the tenant if needed and a new key for it; returns the key, which is never stored in clear."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(id=new_id(), name=tenant_name, created_at=utcnow())
        session.add(tenant)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(id=new_id(), tenant_id=tenant.id, prefix=key[:12], key_hash=hash_key(key), created_at=utcnow()))
    session.commit()
    return key


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant owning an unrevoked ``key``, or None."""
    return session.scalar(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )


# --- scans: the API's side --------------------------------------------------------------------------------


def add_scan(session: Session, scan_id: str, tenant_id: str, mode: str, spec: dict[str, Any],
             inputs: dict[str, Any]) -> Scan:
    """A queued scan; one that wants a webhook (``notify.url``) gets its delivery id now, so that its end,
    whichever path writes it, is the outbox record the webhook is sent from (store/webhooks.py)."""
    now = utcnow()
    wants_webhook = bool((spec.get("notify") or {}).get("url"))
    scan = Scan(id=scan_id, tenant_id=tenant_id, status=ScanStatus.queued.value, mode=mode, stage=None, progress=0.0,
                spec=spec, inputs=inputs, artifacts={}, report=None, timings={}, attempts=0,
                cancel_requested=False, created_at=now, updated_at=now,
                webhook_delivery_id=new_id() if wants_webhook else None)
    session.add(scan)
    session.commit()
    return scan


def get_scan(session: Session, tenant_id: str, scan_id: str) -> Scan | None:
    """The tenant's scan ``scan_id``; ``None`` for another tenant's, a missing one, or an id of no scan's shape."""
    if not is_scan_id(scan_id):
        return None
    return session.scalar(select(Scan).where(Scan.id == scan_id, Scan.tenant_id == tenant_id))


def encode_cursor(created_at: datetime, scan_id: str) -> str:
    """The opaque position after a scan in the newest-first listing (``store/reads.py`` pages with it)."""
    return base64.urlsafe_b64encode(f"{as_utc(created_at).isoformat()}|{scan_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Raises ValueError for a cursor this service did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, scan_id = raw.split("|", 1)
        if not is_scan_id(scan_id):  # e.g. a NUL, which PostgreSQL would refuse with a 500
            raise ValueError(scan_id)
        return datetime.fromisoformat(created), scan_id
    except Exception as exc:  # noqa: BLE001 - any garbage is the same client error
        raise ValueError("cursor is not one this service returned") from exc


def request_cancel(session: Session, scan: Scan) -> None:
    """A queued scan is canceled at once; a running one when the worker next reports progress.

    The status is changed by a conditional UPDATE, not from the ``scan`` the caller read: a worker may have
    claimed the scan since (queued -> running), and a stale read must not mark a running scan canceled
    under it. ``scan`` is refreshed to what was written."""
    canceled = session.execute(
        update(Scan).where(Scan.id == scan.id, Scan.status == ScanStatus.queued.value)
        .values(status=ScanStatus.canceled.value, finished_at=utcnow(), cancel_requested=True)
        .execution_options(synchronize_session=False)).rowcount
    if not canceled:
        session.execute(update(Scan).where(Scan.id == scan.id).values(cancel_requested=True)
                        .execution_options(synchronize_session=False))
    session.commit()
    session.refresh(scan)


def delete_scan(session: Session, scan: Scan) -> None:
    session.delete(scan)
    session.commit()


def count_active_scans(session: Session, tenant_id: str) -> int:
    """The tenant's queued and running scans (its cap, ANTIDOTE_MAX_ACTIVE_SCANS_PER_TENANT, is checked on
    POST /scans; the tenant and status indexes make it one index range)."""
    return int(session.scalar(select(func.count()).select_from(Scan).where(
        Scan.tenant_id == tenant_id, Scan.status.in_([ScanStatus.queued.value, ScanStatus.running.value]))) or 0)


def count_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Scan.status, func.count()).group_by(Scan.status)).all()
    counts = {s.value: 0 for s in ScanStatus}
    counts.update({status: n for status, n in rows})
    return counts


def recent_timings(session: Session, limit: int = 1000) -> list[dict[str, float]]:
    """Stage timings of the most recently finished scans (the API exports them to Prometheus)."""
    rows = session.scalars(
        select(Scan.timings).where(Scan.finished_at.is_not(None)).order_by(Scan.finished_at.desc()).limit(limit)
    ).all()
    return [r for r in rows if r]


def unfinished_scan_ids(session: Session) -> list[str]:
    """Queued or running scans, oldest first: what a restarted embedded server must deliver again."""
    return list(session.scalars(
        select(Scan.id).where(Scan.status.in_([ScanStatus.queued.value, ScanStatus.running.value]))
        .order_by(Scan.created_at)
    ).all())


# --- scans: the worker's side -----------------------------------------------------------------------------


def claim_scan(session: Session, scan_id: str, max_attempts: int) -> Scan | None:
    """Mark a scan running for this delivery; None when there is nothing to do (finished, canceled, gone).

    A running scan is claimed again on purpose: it is a delivery repeated after a worker died.
    """
    scan = session.get(Scan, scan_id, with_for_update=True)
    if scan is None or scan.status in TERMINAL_STATUSES:
        session.rollback()
        return None
    now = utcnow()
    if scan.cancel_requested:
        scan.status, scan.finished_at = ScanStatus.canceled.value, now
        session.commit()
        return None
    if scan.attempts >= max_attempts:
        scan.status, scan.finished_at = ScanStatus.failed.value, now
        scan.error_code = "worker_lost"
        scan.error_message = (f"the scan was started {scan.attempts} times and its worker died each time "
                              "(out of memory?); try a smaller model or data set")
        session.commit()
        return None
    scan.status = ScanStatus.running.value
    scan.attempts += 1
    scan.started_at = scan.started_at or now
    scan.stage, scan.progress = "starting", 0.0
    session.commit()
    return scan


def record_progress(session: Session, scan_id: str, stage: str, progress: float,
                    timings: dict[str, float]) -> bool:
    """Write progress; returns True if the client asked to cancel the scan."""
    session.execute(update(Scan).where(Scan.id == scan_id, Scan.status == ScanStatus.running.value)
                    .values(stage=stage, progress=progress, timings=timings, updated_at=utcnow()))
    session.commit()
    return bool(session.scalar(select(Scan.cancel_requested).where(Scan.id == scan_id)))


def finish_scan(session: Session, scan_id: str, report: dict[str, Any], artifacts: dict[str, Any],
                timings: dict[str, float]) -> bool:
    """Mark succeeded unless the scan was canceled or finished meanwhile; returns whether it was. The verdict's
    label and score go to their own columns in the same write (the scans page lists them)."""
    label, score = verdict_columns(report)
    result = session.execute(
        update(Scan).where(Scan.id == scan_id, Scan.status == ScanStatus.running.value)
        .values(status=ScanStatus.succeeded.value, stage="done", progress=1.0, report=report,
                artifacts=artifacts, timings=timings, finished_at=utcnow(), updated_at=utcnow(),
                verdict_label=label, verdict_score=score)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def verdict_columns(report: dict[str, Any]) -> tuple[str | None, float | None]:
    """(label, score) of ``report["verdict"]``; (None, None) when the detector did not run."""
    verdict = report.get("verdict")
    if not isinstance(verdict, dict) or not isinstance(verdict.get("label"), str):
        return None, None
    score = verdict.get("score")
    return verdict["label"][:16], float(score) if isinstance(score, int | float) else None


def end_scan(session: Session, scan_id: str, status: ScanStatus, code: str | None = None,
             message: str | None = None, timings: dict[str, float] | None = None) -> None:
    """Mark a running scan failed or canceled, with a code and a message a user can act on."""
    values: dict[str, Any] = {"status": status.value, "finished_at": utcnow(), "updated_at": utcnow(),
                              "error_code": code, "error_message": message}
    if timings is not None:
        values["timings"] = timings
    session.execute(update(Scan).where(Scan.id == scan_id, Scan.status.in_(
        [ScanStatus.running.value, ScanStatus.queued.value])).values(**values))
    session.commit()


def fail_stale_running(session: Session, stale_after_s: float, time_limit_s: float,
                       now: datetime | None = None) -> list[str]:
    """Fail the running scans that have shown no progress for ``stale_after_s``; returns their ids.

    Such a scan's task was stopped without a trace (Celery's hard time limit acknowledges the task it kills;
    a worker lost for good never reports), so it would stay ``running`` forever. The code is ``time_limit``
    when the scan started longer ago than the time limit, else ``worker_lost``. Timestamps are compared in
    Python: SQLite hands them back naive."""
    now = now or utcnow()
    rows = session.execute(select(Scan.id, Scan.updated_at, Scan.started_at)
                           .where(Scan.status == ScanStatus.running.value)).all()
    failed = []
    for scan_id, updated_at, started_at in rows:
        silent = (now - as_utc(updated_at)).total_seconds()
        if silent < stale_after_s:
            continue
        ran = (now - as_utc(started_at or updated_at)).total_seconds()
        code = "time_limit" if ran > time_limit_s else "worker_lost"
        message = (f"the scan showed no progress for {silent:.0f} s and its worker was stopped "
                   + (f"by the hard time limit ({time_limit_s:.0f} s + 120 s); use fewer images or a smaller "
                      "model, or ask the operator to raise ANTIDOTE_SCAN_TIME_LIMIT_S" if code == "time_limit"
                      else "without finishing it (killed or lost); submit it again"))
        result = session.execute(update(Scan).where(Scan.id == scan_id, Scan.status == ScanStatus.running.value,
                                                    Scan.updated_at == updated_at)
                                 .values(status=ScanStatus.failed.value, error_code=code, error_message=message,
                                         finished_at=now, updated_at=now))
        if result.rowcount == 1:  # type: ignore[attr-defined]
            failed.append(scan_id)
    session.commit()
    return failed


def requeue_running(session: Session) -> int:
    """Embedded restart: scans left ``running`` by a dead process go back to ``queued``."""
    result = session.execute(update(Scan).where(Scan.status == ScanStatus.running.value)
                             .values(status=ScanStatus.queued.value, stage=None, updated_at=utcnow()))
    session.commit()
    return result.rowcount  # type: ignore[attr-defined]
