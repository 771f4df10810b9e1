"""Database tables: tenants, their hashed API keys, scans, and the attempts of their webhooks."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(dt: datetime) -> datetime:
    """SQLite returns naive datetimes even for ``timezone=True`` columns; they were written as UTC."""
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


class ScanStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


TERMINAL_STATUSES = frozenset({ScanStatus.succeeded, ScanStatus.failed, ScanStatus.canceled})


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # HMAC key of the tenant's webhooks; in clear because the worker must sign with it (`antidote keys
    # webhook-secret` shows and rotates it)
    webhook_secret: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ApiKey(Base):
    """Only the SHA-256 of a key is stored: keys are 256-bit random, so a slow hash buys nothing."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


# the webhook outbox (store/webhooks.py): scans that want a webhook and whose delivery task is not sent yet
WEBHOOK_UNSENT = "webhook_delivery_id IS NOT NULL AND webhook_queued_at IS NULL"


class Scan(Base):
    __tablename__ = "scans"
    __table_args__ = (Index("ix_scans_tenant_created", "tenant_id", "created_at", "id"),
                      Index("ix_scans_webhook_unsent", "finished_at", postgresql_where=text(WEBHOOK_UNSENT),
                            sqlite_where=text(WEBHOOK_UNSENT)))

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), index=True, default=ScanStatus.queued.value)
    mode: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str | None] = mapped_column(String(64), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    inputs: Mapped[dict[str, Any]] = mapped_column(JSONType)
    artifacts: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    timings: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # report["verdict"]'s label and score, written with the report so that listings need not read reports
    verdict_label: Mapped[str | None] = mapped_column(String(16), nullable=True)
    verdict_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the webhook outbox: the id of the scan's one "scan.ended" delivery (set at creation when the spec has
    # notify.url), and when its task was sent; ended + unsent is what the API's sweep sends
    webhook_delivery_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    webhook_queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class WebhookAttempt(Base):
    """One try of one webhook delivery: when, the HTTP status or the error, and how long it took."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_scan", "scan_id", "attempted_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    scan_id: Mapped[str] = mapped_column(ForeignKey("scans.id", ondelete="CASCADE"))
    delivery_id: Mapped[str] = mapped_column(String(36))
    attempt: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    attempted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration_ms: Mapped[float] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(16))  # delivered, retrying, failed, refused
