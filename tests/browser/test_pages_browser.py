"""The HTML pages in a real browser: Debian's headless Chromium driven by Playwright, against a running
``antidote serve`` holding a real finished repair scan (the digits demo model). Screenshots are kept in
.artifacts/browser/ (git-ignored) for CI to upload."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.links import sign
from tests.e2e.test_embedded import Server, _cli
from tests.helpers import NO_DETECT, SPEC_MODEL, backdoored_digits, write_npz, write_safetensors
from tests.integration.workers import wait_for

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / ".artifacts" / "browser"
# small on purpose: one unlearning epoch, two candidates of n, one fine-tuning epoch (the plots need a sweep)
REPAIR_PARAMS = {"augment": False, "batch_size": 64, "unlearn_max_epochs": 1, "finetune_epochs": 1,
                 "auto_candidates": [0.1, 0.5]}
# the detector on, with the short search the e2e test uses (about a second per model here): the report then has
# a verdict and an inverted trigger PNG (artifact trigger_class_<k>) for each suspected class
# the feature inversion: on this small model it names the target however the model's training rounded (Neural
# Cleanse at 60 steps named it with one thread and found nothing with two, on the same CPU)
CHEAP_DETECT = {"enabled": True, "params": {"detectors": ["feature_inversion"], "fi_steps": 60, "max_images": 200}}

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.timeout(600),  # the module's fixture runs two real scans first
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")]


class Served:
    """One server, two tenants, A's finished repair scan (detector on) and B's finished scan (detector off)."""

    def __init__(self, server: Server, key_a: str, key_b: str, scan_a: str, scan_b: str) -> None:
        self.server, self.key_a, self.key_b, self.scan_a, self.scan_b = server, key_a, key_b, scan_a, scan_b

    def link(self, key: str, scan_id: str | None) -> str:
        path = f"/scans/{scan_id}/links" if scan_id else "/scans/links"
        r = httpx.post(f"{self.server.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 201, r.text
        return str(r.json()["url"])


def _submit(url: str, key: str, spec: dict[str, Any], files: dict[str, Path]) -> str:
    parts = {name: (path.name, path.read_bytes()) for name, path in files.items()}
    r = httpx.post(f"{url}/scans", headers={"Authorization": f"Bearer {key}"}, files=parts,
                   data={"spec": json.dumps(spec)}, timeout=60)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("browser")
    server = Server(tmp / "data", tmp / "serve.log")
    server.start()
    try:
        key_a = _cli("keys", "create", "--tenant", "alpha", data_dir=server.data_dir).stdout.strip()
        key_b = _cli("keys", "create", "--tenant", "beta", data_dir=server.data_dir).stdout.strip()
        state, clean, test = backdoored_digits()  # cached: the e2e tests reuse it in the same process
        files = {"model": write_safetensors(tmp / "m.safetensors", state),
                 "clean_data": write_npz(tmp / "c.npz", clean), "test_data": write_npz(tmp / "t.npz", test)}
        attack = {"type": "badnets", "target": 0}
        scan_a = _submit(server.url, key_a, {"mode": "repair", "model": SPEC_MODEL, "attack": attack,
                                             "repair": {"method": "tsbd", "params": REPAIR_PARAMS},
                                             "detect": CHEAP_DETECT}, files)
        scan_b = _submit(server.url, key_b, {"mode": "scan", "model": SPEC_MODEL, "attack": attack,
                                             "detect": NO_DETECT}, files)
        for key, scan_id in ((key_a, scan_a), (key_b, scan_b)):
            def status(k: str = key, s: str = scan_id) -> str:
                body = httpx.get(f"{server.url}/scans/{s}", headers={"Authorization": f"Bearer {k}"}, timeout=10)
                return str(body.json()["status"])
            final = wait_for(lambda st=status: st() in ("succeeded", "failed", "canceled") and st(), 240, 0.5,
                             f"scan {scan_id} to end (log: {server.log})")
            assert final == "succeeded", server.log.read_text()[-3000:]
        yield Served(server, key_a, key_b, scan_a, scan_b)
    finally:
        server.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def debian_chromium() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


def _images_loaded(page: Any) -> list[dict[str, Any]]:
    page.wait_for_load_state("load")
    return page.eval_on_selector_all("img", "els => els.map(e => ({src: e.src, w: e.naturalWidth, ok: e.complete}))")


def test_report_page_shows_the_verdict_scores_and_plots(served: Served, debian_chromium: Any) -> None:
    page = debian_chromium.new_page(viewport={"width": 1100, "height": 900})
    response = page.goto(served.link(served.key_a, served.scan_a))
    assert response.status == 200
    report = httpx.get(f"{served.server.url}/scans/{served.scan_a}/report",
                       headers={"Authorization": f"Bearer {served.key_a}"}, timeout=10).json()
    verdict = report["verdict"]
    assert verdict["label"] in ("clean", "suspicious", "backdoored") and verdict["suspected_targets"], verdict
    assert f"Verdict: {verdict['label']}" in page.locator("#verdict").inner_text()
    assert page.locator("#scores").inner_text().count("%") >= 4  # ACC and ASR, before and after
    images = _images_loaded(page)
    srcs = " ".join(i["src"] for i in images)
    assert "figures/scores.png" in srcs and "figures/nwc.png" in srcs and "figures/sweep.png" in srcs
    # the inverted trigger of each suspected class, served from the scan's PNG artifacts, and loaded
    triggers = page.eval_on_selector_all("img.trigger", "els => els.map(e => ({src: e.src, w: e.naturalWidth, "
                                                        "h: e.naturalHeight}))")
    shown = {t["src"].split("/images/")[1].split("?")[0] for t in triggers}
    assert {f"trigger_class_{k}" for k in verdict["suspected_targets"]} <= shown, (shown, verdict)
    assert all(t["w"] == 8 and t["h"] == 8 for t in triggers), triggers  # the 8x8 digits' trigger size
    assert all(i["ok"] and i["w"] > 0 for i in images), images
    assert all(i["src"].startswith(served.server.url + "/") for i in images)  # nothing from outside
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
    page.close()


def test_scans_page_lists_only_the_tenants_scans(served: Served, debian_chromium: Any) -> None:
    page = debian_chromium.new_page()
    assert page.goto(served.link(served.key_a, None)).status == 200
    listed = page.eval_on_selector_all("tr.scan", "rows => rows.map(r => r.dataset.id)")
    assert listed == [served.scan_a]
    label = httpx.get(f"{served.server.url}/scans/{served.scan_a}/report", timeout=10,
                      headers={"Authorization": f"Bearer {served.key_a}"}).json()["verdict"]["label"]
    assert page.locator(f"tr.scan[data-id='{served.scan_a}'] td.verdict").inner_text().startswith(label)
    page.click(f"tr.scan[data-id='{served.scan_a}'] a")  # the row's link carries its own scan token
    page.wait_for_url(f"**/scans/{served.scan_a}/report.html?token=*")
    assert all(i["w"] > 0 for i in _images_loaded(page))
    page.screenshot(path=str(ARTIFACTS / "scans.png"), full_page=True)
    token = served.link(served.key_a, served.scan_a).split("token=")[1]
    # A's token on B's page: answered like a scan that does not exist, the very answer A's key gets there
    other = page.goto(f"{served.server.url}/scans/{served.scan_b}/report.html?token={token}")
    assert other.status == 404
    token_body = other.json()
    page.close()
    with_key = debian_chromium.new_page(extra_http_headers={"Authorization": f"Bearer {served.key_a}"})
    keyed = with_key.goto(f"{served.server.url}/scans/{served.scan_b}/report.html")
    assert keyed.status == 404 and keyed.json() == token_body == {"detail": f"no scan {served.scan_b!r}"}
    assert with_key.goto(f"{served.server.url}/scans/{served.scan_a}/report.html").status == 200
    with_key.close()


def test_expired_or_tampered_token_is_refused(served: Served, debian_chromium: Any) -> None:
    page = debian_chromium.new_page()
    url = served.link(served.key_a, served.scan_a)
    tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
    assert page.goto(tampered).status == 401
    secret = (served.server.data_dir / "link_secret").read_text().strip().encode()
    tenant = url.split("token=")[1].split(".")[0]  # TENANT.SCOPE.EXPIRY.MAC
    expired, _ = sign(secret, tenant, served.scan_a, 60, now=time.time() - 120)
    answer = page.goto(f"{served.server.url}/scans/{served.scan_a}/report.html?token={expired}")
    assert answer.status == 401 and "expired" in page.content()
    page.close()


def test_antidote_open_prints_a_working_link(served: Served, debian_chromium: Any) -> None:
    env_key = {"api_key": served.key_a}
    run = _cli("open", served.scan_a, "--no-browser", "--url", served.server.url, data_dir=served.server.data_dir,
               **env_key)
    assert run.returncode == 0, run.stderr
    url = run.stdout.strip()
    assert url.startswith(f"{served.server.url}/scans/{served.scan_a}/report.html?token=")
    page = debian_chromium.new_page()
    assert page.goto(url).status == 200
    listing = _cli("open", "--no-browser", "--url", served.server.url, data_dir=served.server.data_dir, **env_key)
    assert listing.returncode == 0 and page.goto(listing.stdout.strip()).status == 200
    assert served.scan_a in page.content()
    page.close()
    foreign = _cli("open", served.scan_b, "--no-browser", "--url", served.server.url,
                   data_dir=served.server.data_dir, **env_key)
    assert foreign.returncode == 2 and "404" in foreign.stderr
