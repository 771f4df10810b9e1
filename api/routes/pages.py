"""The browser pages: a scan's HTML report with its figures, the tenant's scans, and signed links to them.

Same tenant rules as the JSON API: a page answers ``Authorization: Bearer`` or a signed ``?token=``
(api/links.py) scoped to one scan (its page and images) or to the list page; another tenant's scan is a 404."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from jinja2 import Environment, FileSystemLoader
from pydantic import BaseModel

from api import report_figures
from api.deps import current_tenant
from api.errors import ApiError, ErrorOut
from api.links import LIST_SCOPE, link_secret, read_token, sign
from store import repository
from store.models import Scan, ScanStatus
from store.objects import ObjectNotFound

router = APIRouter(tags=["pages"], responses={404: {"model": ErrorOut, "description": "no such scan for this tenant"}})
TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).resolve().parent.parent / "templates"),
                        autoescape=True, trim_blocks=True, lstrip_blocks=True)
# nothing of the page may come from outside the service; the token in the URL must not leak in a Referer
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


class LinkOut(BaseModel):
    url: str
    expires_at: datetime


def _secret(request: Request) -> bytes:
    state = request.app.state
    if getattr(state, "link_secret", None) is None:
        state.link_secret = link_secret(state.settings)
    return state.link_secret  # type: ignore[no-any-return]


async def _tenant_id(request: Request, scope: str) -> str:
    """The tenant behind the Bearer key, or behind a valid link token for ``scope``; 401 without a credential
    or with a forged or expired one. An authentic token for another scope opens nothing: on a scan's page it
    is answered exactly like a scan that does not exist (404, as the API answers a key of another tenant), so
    a link reveals nothing about other scans; on the list page (no scan to hide) it is a 401."""
    if request.headers.get("authorization"):
        return (await current_tenant(request)).id
    token = request.query_params.get("token")
    if not token:
        raise ApiError(401, "send Authorization: Bearer <key>, or open a signed link (POST /scans/{id}/links, "
                            "antidote open)", field="token", headers={"WWW-Authenticate": "Bearer"})
    tenant_id, token_scope = read_token(_secret(request), token)
    if token_scope != scope:
        if scope == LIST_SCOPE:
            raise ApiError(401, "this link token opens one scan's page, not the scans list", field="token")
        raise ApiError(404, f"no scan {scope!r}")  # word for word what _load_scan answers for a missing scan
    return tenant_id


def _token(request: Request, tenant_id: str, scope: str) -> tuple[str, int]:
    return sign(_secret(request), tenant_id, scope, request.app.state.settings.link_ttl_s)


def _link(request: Request, path: str, token: str, expires: int) -> LinkOut:
    url = f"{str(request.base_url).rstrip('/')}{path}?token={token}"
    return LinkOut(url=url, expires_at=datetime.fromtimestamp(expires, UTC))


def _html(template: str, **context: Any) -> Response:
    return Response(TEMPLATES.get_template(template).render(**context), media_type="text/html; charset=utf-8",
                    headers=PAGE_HEADERS)


def _load_scan(request: Request, tenant_id: str, scan_id: str) -> Scan:
    with request.app.state.sessions() as session:
        scan = repository.get_scan(session, tenant_id, scan_id)
        if scan is None:
            raise ApiError(404, f"no scan {scan_id!r}")
        session.expunge(scan)
    return scan


@router.post("/scans/{scan_id}/links", status_code=201, response_model=LinkOut)
async def create_scan_link(scan_id: str, request: Request) -> LinkOut:
    """A signed URL of the scan's HTML report (and its images) that works for ANTIDOTE_LINK_TTL_S seconds."""
    tenant = await current_tenant(request)
    if await request.app.state.reads.scan(tenant.id, scan_id) is None:
        raise ApiError(404, f"no scan {scan_id!r}")
    return _link(request, f"/scans/{scan_id}/report.html", *_token(request, tenant.id, scan_id))


@router.post("/scans/links", status_code=201, response_model=LinkOut)
async def create_list_link(request: Request) -> LinkOut:
    """A signed URL of the scans page (scans.html) that works for ANTIDOTE_LINK_TTL_S seconds."""
    tenant = await current_tenant(request)
    return _link(request, "/scans.html", *_token(request, tenant.id, LIST_SCOPE))


@router.get("/scans/{scan_id}/report.html", response_class=Response,
            responses={200: {"content": {"text/html": {}}, "description": "the report page"}})
async def report_page(scan_id: str, request: Request) -> Response:
    """The scan's report as a page: verdict, scores, figures, findings, timings, parameters; a scan that has
    not succeeded shows its status and error (and refreshes itself while it runs)."""
    tenant_id = await _tenant_id(request, scan_id)
    scan = await run_in_threadpool(_load_scan, request, tenant_id, scan_id)
    report = scan.report if scan.status == ScanStatus.succeeded.value and scan.report else None
    token, _ = _token(request, tenant_id, scan_id)  # the <img> requests carry no header: they get a token
    images = [name for name, info in sorted((scan.artifacts or {}).items())
              if str(info.get("media_type", "")).startswith("image/")]
    return _html("report.html", scan=scan, report=report, token=token, images=images,
                 figures=report_figures.available(report) if report else [],
                 running=scan.status in (ScanStatus.queued.value, ScanStatus.running.value))


@router.get("/scans/{scan_id}/figures/{name}.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the figure"}})
async def figure(scan_id: str, name: str, request: Request) -> Response:
    """One plot of the report (scores, nwc, sweep) as PNG."""
    tenant_id = await _tenant_id(request, scan_id)
    scan = await run_in_threadpool(_load_scan, request, tenant_id, scan_id)
    draw = report_figures.FIGURES.get(name)
    if draw is None:
        raise ApiError(404, f"no figure {name!r}; figures: {', '.join(report_figures.FIGURES)}", field="name")
    png = await run_in_threadpool(draw, scan.report) if scan.report else None
    if png is None:
        raise ApiError(404, f"scan {scan_id} has no data for the figure {name!r}", field="name")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@router.get("/scans/{scan_id}/images/{name}", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the image artifact"}})
async def image_artifact(scan_id: str, name: str, request: Request) -> Response:
    """An image artifact of the scan (e.g. an inverted trigger), inline; other artifacts are not served here."""
    tenant_id = await _tenant_id(request, scan_id)
    scan = await run_in_threadpool(_load_scan, request, tenant_id, scan_id)
    info = (scan.artifacts or {}).get(name)
    if info is None or not str(info.get("media_type", "")).startswith("image/"):
        raise ApiError(404, f"scan {scan_id} has no image artifact {name!r}", field="name")
    try:
        data = await run_in_threadpool(lambda: b"".join(request.app.state.store.iter_bytes(info["key"])))
    except ObjectNotFound as exc:
        raise ApiError(404, f"artifact {name!r} is gone from storage") from exc
    return Response(data, media_type=info["media_type"], headers={"Cache-Control": "private, max-age=300"})


@router.get("/scans.html", response_class=Response,
            responses={200: {"content": {"text/html": {}}, "description": "the scans page"}})
async def scans_page(request: Request, status: ScanStatus | None = None, limit: int = Query(20, ge=1, le=200),
                     cursor: str | None = None) -> Response:
    """The tenant's scans, newest first, paginated like GET /scans, each linked to its report page."""
    tenant_id = await _tenant_id(request, LIST_SCOPE)
    try:
        page = await request.app.state.reads.scans(tenant_id, status.value if status else None, limit, cursor)
    except ValueError as exc:
        raise ApiError(422, f"cursor: {exc}", field="cursor") from exc
    # the verdict columns come with the page's rows: no report is read to list them
    rows = [{"scan": s, "verdict": s.verdict_label, "score": s.verdict_score,
             "token": _token(request, tenant_id, s.id)[0]} for s in page.items]
    return _html("scans.html", rows=rows, next_cursor=page.next_cursor, limit=limit,
                 status=status.value if status else None, token=_token(request, tenant_id, LIST_SCOPE)[0])
