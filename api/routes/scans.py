"""``/scans``: create, read, list, report, artifacts, cancel and delete."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from api.deps import current_tenant, get_session
from api.errors import ERROR_RESPONSES, ApiError, ErrorOut
from api.routes.webhooks import check_notify_host, send_ended_webhook
from api.schemas import ScanCreated, ScanOut, ScanPageOut
from api.uploads import SPEC_MAX_BYTES, PartRule, ReceivedForm, check_form_headers, declared_length, receive_form
from core.data.formats import DataLimits
from core.inputs import InputError, ScanInputs, UploadedFile, load_inputs
from core.pipeline import available_modes
from core.spec import ScanSpec
from store import repository
from store.logs import scan_id_var
from store.models import TERMINAL_STATUSES, Scan, ScanStatus, Tenant
from store.objects import ObjectNotFound
from store.queue import enqueue_scan
from store.settings import Settings

router = APIRouter(tags=["scans"], responses={404: {"model": ErrorOut, "description": "no such scan for this tenant"}})
log = logging.getLogger("antidote.api")
FILE_PARTS = ("model", "clean_data", "test_data", "poisoned_data", "training_data")


@router.post("/scans", status_code=202, response_model=ScanCreated, responses={
    **ERROR_RESPONSES,
    408: {"model": ErrorOut, "description": "the upload stopped before its end"},
    413: {"model": ErrorOut, "description": "an upload over its limit"},
    415: {"model": ErrorOut, "description": "not multipart/form-data, or a file format not in the contract"},
    422: {"model": ErrorOut, "description": "invalid spec or data; the answer names the field"},
    429: {"model": ErrorOut, "description": "the tenant has ANTIDOTE_MAX_ACTIVE_SCANS_PER_TENANT scans queued "
                                            "or running"},
    503: {"model": ErrorOut, "description": "too many uploads at once, or the queue is down; see Retry-After"}},
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["model", "spec", "clean_data"],
        "properties": {"spec": {"type": "string", "description": "the scan spec, JSON (docs/api.md)"},
                       **{p: {"type": "string", "format": "binary"} for p in FILE_PARTS}}}}}}})
async def create_scan(request: Request, response: Response, tenant: Tenant = Depends(current_tenant)) -> ScanCreated:
    """Upload a model, a clean data subset and a spec; the scan is queued once every part checks out.

    Parts: ``model``, ``spec`` (JSON), ``clean_data``, and optionally ``test_data``, ``poisoned_data``,
    ``training_data`` (docs/api.md, the API reference). Every refusal that needs no body (401, 413 by
    ``Content-Length``, 415, 429, 503) comes before a byte of it is read, so it costs no disk."""
    state = request.app.state
    settings = state.settings
    check_form_headers(request, settings.max_upload_bytes)
    await run_in_threadpool(_check_tenant_cap, request, tenant)
    rules = {"spec": PartRule(SPEC_MAX_BYTES, is_file=False), "model": PartRule(settings.max_model_bytes, True)}
    rules.update({p: PartRule(settings.max_data_bytes, True) for p in FILE_PARTS[1:]})
    with (state.upload_budget.admit(declared_length(request)) as ticket,
          tempfile.TemporaryDirectory(prefix="antidote-upload-", ignore_cleanup_errors=True) as tmp):
        form = await receive_form(request, rules, settings.max_upload_bytes, Path(tmp), on_bytes=ticket.spool)
        state.metrics.upload_bytes.inc(form.total_bytes)
        spec = _parse_spec(form, settings)
        inputs = _scan_inputs(form)
        try:
            await run_in_threadpool(load_inputs, spec, inputs, DataLimits(**settings.data_limits()))
        except InputError as exc:
            raise ApiError(415 if exc.unsupported else 422, str(exc), field=exc.field,
                           findings=exc.findings) from exc
        scan_id = repository.new_id()
        await run_in_threadpool(_check_tenant_cap, request, tenant)  # again: others may have queued meanwhile
        await run_in_threadpool(_store_scan, request, scan_id, tenant.id, spec, form)
    response.headers["Location"] = f"/scans/{scan_id}"
    token = scan_id_var.set(scan_id)
    log.info("scan queued", extra={"tenant": tenant.name, "bytes": form.total_bytes, "mode": spec.mode})
    scan_id_var.reset(token)
    return ScanCreated(id=scan_id, status=ScanStatus.queued.value)


def _check_tenant_cap(request: Request, tenant: Tenant) -> None:
    """429 when the tenant already has its cap of queued and running scans."""
    settings = request.app.state.settings
    cap = settings.max_active_scans_per_tenant
    with request.app.state.sessions() as session:
        active = repository.count_active_scans(session, tenant.id)
    if active >= cap:
        raise ApiError(429, f"tenant {tenant.name!r} has {active} scans queued or running, the cap is "
                            f"ANTIDOTE_MAX_ACTIVE_SCANS_PER_TENANT={cap}; retry when some have finished",
                       headers={"Retry-After": str(settings.retry_after_s)})


def _parse_spec(form: ReceivedForm, settings: Settings) -> ScanSpec:
    for part in ("spec", "model", "clean_data"):
        if part not in form.fields and part not in form.files:
            raise ApiError(422, f"missing required part {part!r}", field=part)
    try:
        spec = ScanSpec.model_validate_json(form.fields["spec"])
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in ("spec", *first["loc"]))
        raise ApiError(422, f"{loc}: {first['msg']}", field=loc) from exc
    if (where := nul_path(spec.model_dump(mode="json"), "spec")) is not None:
        raise ApiError(422, f"{where}: must not contain a NUL character (\\u0000)", field=where)
    if spec.mode not in available_modes():
        raise ApiError(422, f"spec.mode: mode {spec.mode!r} is not available yet; available: "
                            f"{', '.join(available_modes())}", field="spec.mode")
    if spec.notify is not None:
        check_notify_host(spec.notify.url, settings)
    return spec


def nul_path(value: Any, path: str) -> str | None:
    """The dotted path of the first string (value or key) in ``value`` holding a NUL, else ``None``.

    The spec is stored as JSON, and PostgreSQL's jsonb refuses ``\\u0000``: such a spec, valid to every
    field's own check (a ``layer_exclude`` entry, say), failed its INSERT with a 500."""
    if isinstance(value, str):
        return path if "\0" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if "\0" in str(key):
                return f"{path}.{key}"
            if (found := nul_path(item, f"{path}.{key}")) is not None:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            if (found := nul_path(item, f"{path}.{i}")) is not None:
                return found
    return None


def _scan_inputs(form: ReceivedForm) -> ScanInputs:
    files = {p: UploadedFile(f.path, f.filename) for p, f in form.files.items()}
    return ScanInputs(**files)  # type: ignore[arg-type]


def _store_scan(request: Request, scan_id: str, tenant_id: str, spec: ScanSpec, form: ReceivedForm) -> None:
    """Files first, then the row, then the task: a failure at any step leaves nothing half-written behind."""
    state = request.app.state
    prefix = f"scans/{scan_id}"
    inputs: dict[str, Any] = {}
    try:
        for part, received in form.files.items():
            suffix = Path(received.filename).suffix.lower()
            key = f"{prefix}/inputs/{part}{suffix}"
            state.store.put_file(key, received.path)
            inputs[part] = {"key": key, "filename": received.filename, "size": received.size,
                            "sha256": received.sha256}
        with state.sessions() as session:
            repository.add_scan(session, scan_id, tenant_id, spec.mode, spec.model_dump(mode="json"), inputs)
    except Exception:
        state.store.delete_prefix(prefix)
        raise
    try:
        enqueue_scan(state.celery, scan_id, state.settings.queue)
    except Exception as exc:
        log.exception("could not enqueue the scan")
        with state.sessions() as session:
            scan = session.get(Scan, scan_id)
            if scan is not None:
                repository.delete_scan(session, scan)
        state.store.delete_prefix(prefix)
        raise ApiError(503, "the job queue is unavailable; nothing was stored, try again later",
                       headers={"Retry-After": str(state.settings.dependency_retry_after_s)}) from exc


def _own_scan(session: Session, tenant: Tenant, scan_id: str) -> Scan:
    scan = repository.get_scan(session, tenant.id, scan_id)
    if scan is None:
        raise ApiError(404, f"no scan {scan_id!r}")
    return scan


@router.get("/scans/{scan_id}", response_model=ScanOut)
async def read_scan(scan_id: str, request: Request, tenant: Tenant = Depends(current_tenant)) -> Response:
    """Status, stage and progress of one scan."""
    # async with store/reads.py: the path clients poll stays on the event loop, with no ORM session
    scan = await request.app.state.reads.scan(tenant.id, scan_id)
    if scan is None:
        raise ApiError(404, f"no scan {scan_id!r}")
    return json_response(ScanOut.of(scan))


@router.get("/scans", response_model=ScanPageOut)
async def list_scans(request: Request, status: ScanStatus | None = None, limit: int = Query(20, ge=1, le=200),
                     cursor: str | None = None, tenant: Tenant = Depends(current_tenant)) -> Response:
    """The tenant's scans, newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    try:
        page = await request.app.state.reads.scans(tenant.id, status.value if status else None, limit, cursor)
    except ValueError as exc:
        raise ApiError(422, f"cursor: {exc}", field="cursor") from exc
    return json_response(ScanPageOut(items=[ScanOut.of(s) for s in page.items], next_cursor=page.next_cursor))


def json_response(model: BaseModel) -> Response:
    """The model serialised once; returned as a model, FastAPI would validate it again against response_model
    (which still documents the answer)."""
    return Response(model.model_dump_json(), media_type="application/json")


@router.get("/scans/{scan_id}/report", responses={
    409: {"model": ErrorOut, "description": "the scan has not succeeded (yet); the answer says why"}})
def read_report(scan_id: str, tenant: Tenant = Depends(current_tenant),
                session: Session = Depends(get_session)) -> dict[str, Any]:
    """The ACC/ASR report, once the scan has succeeded (409 before)."""
    scan = _own_scan(session, tenant, scan_id)
    if scan.status != ScanStatus.succeeded.value or scan.report is None:
        why = f": {scan.error_code}: {scan.error_message}" if scan.error_code else ""
        raise ApiError(409, f"scan is {scan.status}{why}; the report exists once it has succeeded")
    return {"id": scan.id, **scan.report}


@router.get("/scans/{scan_id}/artifacts/{name}")
def read_artifact(scan_id: str, name: str, request: Request, tenant: Tenant = Depends(current_tenant),
                  session: Session = Depends(get_session)) -> StreamingResponse:
    """A file the scan produced: ``repaired_model`` (safetensors) of a repair, ``sample_scores`` (CSV) of a
    repair_data scan, ``trigger_class_<k>`` (PNG) of the detector."""
    scan = _own_scan(session, tenant, scan_id)
    info = (scan.artifacts or {}).get(name)
    if info is None:
        raise ApiError(404, f"scan {scan_id} has no artifact {name!r}; it has: "
                            f"{', '.join(scan.artifacts or {}) or 'none'}")
    try:
        chunks = request.app.state.store.iter_bytes(info["key"])
    except ObjectNotFound as exc:
        raise ApiError(404, f"artifact {name!r} is gone from storage") from exc
    return StreamingResponse(chunks, media_type=info["media_type"], headers={
        "Content-Disposition": f'attachment; filename="{info["filename"]}"', "Content-Length": str(info["size"])})


@router.delete("/scans/{scan_id}", status_code=202, response_model=ScanOut,
               responses={204: {"description": "a finished scan and its files were deleted"}})
def delete_scan(scan_id: str, request: Request, tenant: Tenant = Depends(current_tenant),
                session: Session = Depends(get_session)) -> Any:
    """Cancel a queued or running scan (202), or delete a finished one and its files (204)."""
    scan = _own_scan(session, tenant, scan_id)
    if scan.status not in TERMINAL_STATUSES:
        repository.request_cancel(session, scan)
        if scan.status == ScanStatus.canceled.value:  # it was queued: no worker will end it, so no webhook either
            send_ended_webhook(request.app, scan.id)
        return ScanOut.of(scan)
    request.app.state.store.delete_prefix(f"scans/{scan.id}")
    repository.delete_scan(session, scan)
    return Response(status_code=204)
