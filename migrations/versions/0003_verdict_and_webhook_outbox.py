"""The verdict as columns (the scans page lists it without reading reports) and the webhook outbox.

``webhook_delivery_id`` is set when a scan with ``notify.url`` is created; the scan's end (any path that makes
it succeeded, failed or canceled) is then the outbox record itself, and ``webhook_queued_at`` says that the
delivery task was sent. Existing rows are filled in: the verdict from their report, a delivery id for the
unfinished scans that want a webhook (ended ones count as sent: their webhooks went out, or were lost, before).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
UNSENT = "webhook_delivery_id IS NOT NULL AND webhook_queued_at IS NULL"
TERMINAL = ("succeeded", "failed", "canceled")


def upgrade() -> None:
    op.add_column("scans", sa.Column("verdict_label", sa.String(16), nullable=True))
    op.add_column("scans", sa.Column("verdict_score", sa.Float(), nullable=True))
    op.add_column("scans", sa.Column("webhook_delivery_id", sa.String(36), nullable=True))
    op.add_column("scans", sa.Column("webhook_queued_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_scans_webhook_unsent", "scans", ["finished_at"],
                    postgresql_where=sa.text(UNSENT), sqlite_where=sa.text(UNSENT))
    _backfill()


def _backfill() -> None:
    """Row by row in Python: the same code on PostgreSQL and SQLite, and reports are not parsed in SQL."""
    scans = sa.table("scans", sa.column("id", sa.String), sa.column("status", sa.String),
                     sa.column("spec", JSONType), sa.column("report", JSONType),
                     sa.column("verdict_label", sa.String), sa.column("verdict_score", sa.Float),
                     sa.column("webhook_delivery_id", sa.String))
    bind = op.get_bind()
    rows = bind.execute(sa.select(scans.c.id, scans.c.status, scans.c.spec, scans.c.report)).all()
    for scan_id, status, spec, report in rows:
        values: dict[str, object] = {}
        verdict = (report or {}).get("verdict") if isinstance(report, dict) else None
        if isinstance(verdict, dict) and isinstance(verdict.get("label"), str):
            values["verdict_label"] = verdict["label"][:16]
            score = verdict.get("score")
            values["verdict_score"] = float(score) if isinstance(score, int | float) else None
        notify = (spec or {}).get("notify") if isinstance(spec, dict) else None
        if status not in TERMINAL and isinstance(notify, dict) and notify.get("url"):
            values["webhook_delivery_id"] = str(uuid.uuid4())
        if values:
            bind.execute(scans.update().where(scans.c.id == scan_id).values(**values))


def downgrade() -> None:
    op.drop_index("ix_scans_webhook_unsent", table_name="scans")
    for column in ("webhook_queued_at", "webhook_delivery_id", "verdict_score", "verdict_label"):
        op.drop_column("scans", column)  # SQLite 3.35+ drops columns in place
