"""The HTML pages and signed links through the real app on the embedded default (no worker: scans are
written with the repository functions the worker uses)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.errors import ApiError
from api.links import LIST_SCOPE, link_secret, sign, verify
from api.report_figures import available, nwc_png, scores_png, sweep_png
from store import repository
from store.db import make_engine, make_session_factory, upgrade_database
from store.models import Scan, ScanStatus
from store.settings import Settings

PNG = b"\x89PNG\r\n\x1a\n"
REPORT: dict[str, Any] = {  # the shape core/pipeline.py and core/defenses/tsbd write
    "mode": "repair", "model": {"architecture": "resnet20", "num_classes": 10}, "data": {"clean_images": 40},
    "before": {"acc": 0.9, "asr": 0.97, "ra": 0.02}, "after": {"acc": 0.88, "asr": 0.05, "ra": 0.8},
    "repair": {"method": "tsbd", "params": {"neuron_ratio": 0.1, "batch_size": 32}, "chosen": {"neuron_ratio": 0.1},
               "timings": {"unlearn": 1.5},
               "details": {"nwc_summary": {"num_channels": 64, "gini": 0.4, "q0": 0.0, "q25": 0.1, "q50": 0.2,
                                           "q75": 0.4, "q90": 0.7, "q95": 0.9, "q99": 1.2, "q100": 2.0},
                           "auto": {"n": 0.1, "sweep": [{"n": 0.05, "accuracy": 0.9, "loss": 0.3, "weights_zeroed": 9},
                                                        {"n": 0.1, "accuracy": 0.6, "loss": 1.1,
                                                         "weights_zeroed": 18}]}}},
    "timings": {"load": 0.2, "evaluate_before": 1.0}, "device": "cpu", "seed": 0,
    "file_findings": [{"kind": "pickle_global", "name": "<script>alert(1)</script>"}],
}


@pytest.fixture
def env(embedded_settings: Settings) -> Iterator[tuple[TestClient, Any, Settings]]:
    from api.app import create_app

    embedded_settings.data_dir.mkdir(parents=True)
    upgrade_database(embedded_settings.resolved_database_url)
    with TestClient(create_app(embedded_settings)) as client:
        yield client, make_session_factory(make_engine(embedded_settings.resolved_database_url)), embedded_settings


def _tenant(sessions: Any, name: str) -> tuple[dict[str, str], str]:
    with sessions() as s:
        key = repository.create_api_key(s, name)
        return {"Authorization": f"Bearer {key}"}, repository.tenant_for_key(s, key).id  # type: ignore[union-attr]


def _scan(sessions: Any, tenant_id: str, report: dict[str, Any] | None, error: str | None = None) -> str:
    scan_id = repository.new_id()
    with sessions() as s:
        repository.add_scan(s, scan_id, tenant_id, "repair", {"mode": "repair"}, {})
        repository.claim_scan(s, scan_id, 3)
        if report is not None:
            assert repository.finish_scan(s, scan_id, report, {}, {})
        elif error:
            repository.end_scan(s, scan_id, ScanStatus.failed, "bad_input", error)
    return scan_id


def test_report_page_escapes_and_links_its_figures(env: tuple[TestClient, Any, Settings]) -> None:
    client, sessions, _ = env
    auth, tenant = _tenant(sessions, "a")
    scan_id = _scan(sessions, tenant, REPORT)
    page = client.get(f"/scans/{scan_id}/report.html", headers=auth)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert "no verdict: the detector did not run" in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for name in ("scores", "nwc", "sweep"):
        assert f"figures/{name}.png?token=" in html
    token = html.split("figures/scores.png?token=")[1].split('"')[0]
    fig = client.get(f"/scans/{scan_id}/figures/scores.png", params={"token": token})
    assert fig.status_code == 200 and fig.content.startswith(PNG)
    assert client.get(f"/scans/{scan_id}/figures/nope.png", headers=auth).status_code == 404


def test_verdict_first_and_failed_scan_renders_its_error(env: tuple[TestClient, Any, Settings]) -> None:
    client, sessions, _ = env
    auth, tenant = _tenant(sessions, "a")
    judged = _scan(sessions, tenant, {**REPORT, "verdict": {"label": "backdoored", "score": 0.93}})
    html = client.get(f"/scans/{judged}/report.html", headers=auth).text
    assert html.index('id="verdict-label"') < html.index('id="scores"') and ">backdoored<" in html
    failed = _scan(sessions, tenant, None, error="the model has no Conv2d <layer>")
    page = client.get(f"/scans/{failed}/report.html", headers=auth)
    assert page.status_code == 200 and "bad_input" in page.text and "no Conv2d &lt;layer&gt;" in page.text


def test_a_repair_data_report_shows_its_counts_and_identification(env: tuple[TestClient, Any, Settings]) -> None:
    client, sessions, _ = env
    auth, tenant = _tenant(sessions, "a")
    section = {"method": "retain", "params": {"epochs": 5}, "training_images": 400, "n_flagged": 37,
               "n_relabelled": 21, "n_dropped": 4, "details": {"threshold_rule": "<clean null>"},
               "identification": {"precision": 0.75, "recall": 0.5, "auroc": 0.875, "n_corrupt": 40,
                                  "n_flagged": 37, "n_flagged_corrupt": 20}, "timings": {"identify": 1.25}}
    report = {key: v for key, v in REPORT.items() if key != "repair"} | {"mode": "repair_data",
                                                                         "repair_data": section}
    html = client.get(f"/scans/{_scan(sessions, tenant, report)}/report.html", headers=auth).text
    table = html.split('id="repair-data"')[1].split("</table>")[0]
    for label, count in (("flagged", 37), ("relabelled (input kept)", 21), ("dropped or unlearned", 4)):
        assert f"<td>{label}</td><td>{count}</td>" in table
    row = html.split('id="identification"')[1].split("</table>")[0]
    assert "<td>75.0%</td><td>50.0%</td><td>0.875</td>" in row
    assert "&lt;clean null&gt;" in html and "<clean null>" not in html
    section["identification"] = None
    html = client.get(f"/scans/{_scan(sessions, tenant, report)}/report.html", headers=auth).text
    assert 'id="identification"' not in html and "no is_corrupt array was uploaded" in html


def test_links_are_scoped_to_one_tenant_and_one_page(env: tuple[TestClient, Any, Settings]) -> None:
    client, sessions, settings = env
    auth_a, tenant_a = _tenant(sessions, "a")
    auth_b, tenant_b = _tenant(sessions, "b")
    mine, theirs = _scan(sessions, tenant_a, REPORT), _scan(sessions, tenant_b, REPORT)
    link = client.post(f"/scans/{mine}/links", headers=auth_a)
    assert link.status_code == 201
    url = link.json()["url"]
    token = url.split("token=")[1]
    assert client.get(url).status_code == 200
    assert client.post(f"/scans/{theirs}/links", headers=auth_a).status_code == 404
    assert client.get(f"/scans/{theirs}/report.html", headers=auth_a).status_code == 404
    other = client.get(f"/scans/{theirs}/report.html", params={"token": token})
    assert other.status_code == 404  # an authentic token for another page opens nothing (more below)
    tampered = token[:-1] + ("0" if token[-1] != "0" else "1")
    assert client.get(f"/scans/{mine}/report.html", params={"token": tampered}).status_code == 401
    assert client.get(f"/scans/{mine}/report.html").status_code == 401
    secret = link_secret(settings)
    expired, _ = sign(secret, tenant_a, mine, 10, now=time.time() - 60)
    refused = client.get(f"/scans/{mine}/report.html", params={"token": expired})
    assert refused.status_code == 401 and "expired" in refused.json()["detail"]
    listing = client.get(client.post("/scans/links", headers=auth_a).json()["url"])
    assert listing.status_code == 200 and mine in listing.text and theirs not in listing.text
    assert client.get("/scans.html", params={"token": token}).status_code == 401  # a scan token is not a list one


@pytest.mark.parametrize("expiry", ["\u00b2", "\u0661\u0662", "9" * 5000])
def test_a_token_whose_expiry_is_no_plain_number_is_401(env: tuple[TestClient, Any, Settings], expiry: str) -> None:
    """'\u00b2' passed str.isdigit() and int() refused it, as it refuses 5,000 digits: both were a 500."""
    client, sessions, _ = env
    _, tenant = _tenant(sessions, "a")
    scan_id = _scan(sessions, tenant, REPORT)
    token = f"{tenant}.{scan_id}.{expiry}.{'0' * 64}"
    for path in (f"/scans/{scan_id}/report.html", f"/scans/{scan_id}/figures/scores.png", "/scans.html"):
        r = client.get(path, params={"token": token})
        assert r.status_code == 401 and r.json()["field"] == "token", (path, r.text)


def test_scans_page_paginates(env: tuple[TestClient, Any, Settings]) -> None:
    client, sessions, _ = env
    auth, tenant = _tenant(sessions, "a")
    ids = [_scan(sessions, tenant, REPORT) for _ in range(3)]
    first = client.get("/scans.html", params={"limit": 2}, headers=auth)
    assert first.status_code == 200 and 'id="next"' in first.text
    href = first.text.split('id="next" href="')[1].split('"')[0].replace("&amp;", "&")
    second = client.get(href)
    assert second.status_code == 200 and 'id="next"' not in second.text
    assert sum(i in first.text + second.text for i in ids) == 3
    assert client.get("/scans.html", params={"cursor": "junk"}, headers=auth).status_code == 422


def test_tokens_and_figures_without_the_app(tmp_path: Any) -> None:
    settings = Settings(data_dir=tmp_path)
    secret = link_secret(settings)
    assert link_secret(settings) == secret and (tmp_path / "link_secret").stat().st_mode & 0o077 == 0
    token, _ = sign(secret, "t1", LIST_SCOPE, 60)
    assert verify(secret, token, LIST_SCOPE) == "t1"
    for bad in ("x", "t1.abc.def", token.replace("t1", "t2", 1)):
        with pytest.raises(ApiError):
            verify(secret, bad, LIST_SCOPE)
    assert available(REPORT) == ["scores", "nwc", "sweep"]
    assert available({"before": {"acc": None, "asr": None, "ra": None}}) == []
    for draw in (scores_png, nwc_png, sweep_png):
        assert draw(REPORT).startswith(PNG)  # type: ignore[union-attr]
    assert sweep_png({"mode": "scan"}) is None


def test_a_token_for_another_scan_is_answered_like_a_missing_scan(env: tuple[TestClient, Any, Settings]) -> None:
    """Whatever the other scan is (the tenant's own, another tenant's, none), the answer is the same 404 body,
    the one a key of another tenant gets; a forged token stays a 401."""
    client, sessions, _ = env
    auth_a, tenant_a = _tenant(sessions, "a")
    _auth_b, tenant_b = _tenant(sessions, "b")
    mine, also_mine, theirs = (_scan(sessions, tenant_a, REPORT), _scan(sessions, tenant_a, REPORT),
                               _scan(sessions, tenant_b, REPORT))
    missing = repository.new_id()
    token = client.post(f"/scans/{mine}/links", headers=auth_a).json()["url"].split("token=")[1]
    list_token = client.post("/scans/links", headers=auth_a).json()["url"].split("token=")[1]

    def answer(path: str, **kw: Any) -> tuple[int, dict[str, Any], str]:
        r = client.get(path, **kw)
        return r.status_code, r.json(), r.headers["content-type"]

    for scan_id in (also_mine, theirs, missing):
        # the answer for a scan that does not exist, as a key gets it; another tenant's scan with a key: the same
        with_key = (404, {"detail": f"no scan {scan_id!r}"}, "application/json")
        if scan_id != also_mine:
            assert answer(f"/scans/{scan_id}/report.html", headers=auth_a) == with_key
        for path in (f"/scans/{scan_id}/report.html", f"/scans/{scan_id}/figures/scores.png",
                     f"/scans/{scan_id}/images/trigger_class_0"):
            for t in (token, list_token):
                assert answer(path, params={"token": t}) == with_key, (path, t == list_token)
    forged = token.replace(mine, theirs)  # the scope swapped in, the MAC left as it was
    assert client.get(f"/scans/{theirs}/report.html", params={"token": forged}).status_code == 401
    assert client.get(f"/scans/{mine}/report.html", params={"token": token}).status_code == 200


def test_the_scans_page_lists_verdicts_from_their_columns(env: tuple[TestClient, Any, Settings]) -> None:
    """finish_scan writes the verdict's label and score to columns; the page shows them even when the report
    is gone (proof that it reads no report), and a scan without a verdict shows n/a."""
    client, sessions, _ = env
    auth, tenant = _tenant(sessions, "a")
    judged = _scan(sessions, tenant, {**REPORT, "verdict": {"label": "backdoored", "score": 0.934}})
    skipped = _scan(sessions, tenant, {**REPORT, "verdict": {"label": None, "skipped": True}})
    with sessions() as s:
        row = s.get(Scan, judged)
        assert (row.verdict_label, row.verdict_score) == ("backdoored", 0.934)
        assert s.get(Scan, skipped).verdict_label is None
        s.execute(update(Scan).values(report=None))  # the listing must not need them
        s.commit()
    html = client.get("/scans.html", headers=auth).text
    cells = {i: html.split(f'data-id="{i}"')[1].split('class="verdict">')[1].split("</td>")[0]
             for i in (judged, skipped)}
    assert cells == {judged: "backdoored (0.93)", skipped: "n/a"}
