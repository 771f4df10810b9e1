"""Response bodies of the REST API (docs/api.md)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from store.models import Scan, as_utc


class ScanError(BaseModel):
    code: str
    message: str


class ScanOut(BaseModel):
    id: str
    status: str
    mode: str
    stage: str | None
    progress: float
    created_at: datetime
    updated_at: datetime
    error: ScanError | None

    @classmethod
    def of(cls, scan: Scan) -> ScanOut:
        error = ScanError(code=scan.error_code, message=scan.error_message or "") if scan.error_code else None
        return cls(id=scan.id, status=scan.status, mode=scan.mode, stage=scan.stage, progress=scan.progress,
                   created_at=as_utc(scan.created_at), updated_at=as_utc(scan.updated_at), error=error)


class ScanCreated(BaseModel):
    id: str
    status: str


class ScanPageOut(BaseModel):
    items: list[ScanOut]
    next_cursor: str | None

