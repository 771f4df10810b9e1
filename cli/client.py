"""The CI client: upload a scan, wait for it with a progress bar, summarise, gate."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

PASS, GATE_FAILED, ERROR = 0, 1, 2
VERDICT_ORDER = ("clean", "suspicious", "backdoored")  # --fail-on X fails on X and anything worse


class ClientError(Exception):
    """Anything that is not the gate's verdict: bad arguments, HTTP errors, a failed scan; ``findings`` are a
    refused checkpoint's (the 422 body's), for --sarif."""

    def __init__(self, message: str, findings: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.findings = findings


def shipped_verdict(report: dict[str, Any]) -> dict[str, Any] | None:
    """The detector's verdict on the model the client will ship: the repaired one's (``after.verdict``) in a
    repair report, else ``verdict``; a bare string is read as the label. None when the report has none."""
    after = report.get("after")
    raw = after.get("verdict") if isinstance(after, dict) and after.get("verdict") is not None \
        else report.get("verdict")
    if isinstance(raw, str):
        return {"verdict": raw}
    return raw if isinstance(raw, dict) else None


def verdict_label(verdict: dict[str, Any]) -> str | None:
    """``clean``/``suspicious``/``backdoored`` from a verdict object (``verdict`` or ``label`` key)."""
    label = verdict.get("verdict", verdict.get("label"))
    return label if label in VERDICT_ORDER else None


def suspected_targets(verdict: dict[str, Any]) -> list[int]:
    """The suspected target classes of a verdict object (top level, or in its evidence)."""
    found = verdict.get("suspected_targets", (verdict.get("evidence") or {}).get("suspected_targets"))
    return list(found) if isinstance(found, list) else []


def max_anomaly_index(verdict: dict[str, Any]) -> float | None:
    """Neural Cleanse's largest small-side anomaly index in the verdict's evidence, if it ran."""
    evidence = verdict.get("evidence") or {}
    nc = (evidence.get("detectors") or {}).get("neural_cleanse") or {}
    value = nc.get("anomaly_index")
    return float(value) if isinstance(value, int | float) else None


def detector_lines(verdict: dict[str, Any]) -> list[str]:
    """One line per detector of a verdict's evidence: its p-value, whether it votes, the classes it suspects
    (an evidence-only detector may point elsewhere than the verdict: the reader should see both)."""
    evidence = verdict.get("evidence") or {}
    out = []
    for name, d in (evidence.get("detectors") or {}).items():
        if not isinstance(d, dict):
            continue
        p = d.get("p_value")
        role = "votes" if d.get("votes") else "evidence"
        targets = d.get("suspected_targets") or []
        skipped = d.get("skipped")
        text = f"skipped: {skipped}" if skipped else (f"p {p:.3g}" if isinstance(p, int | float) else "no p-value")
        out.append(f"  {name} ({role}): {text}" + (f", suspects {targets}" if targets else ""))
    return out


@dataclass
class Gate:
    max_asr: float | None = None
    min_acc: float | None = None
    fail_on: str | None = None  # "suspicious" or "backdoored"
    max_anomaly_index: float | None = None

    def __post_init__(self) -> None:
        if self.fail_on is not None and self.fail_on not in VERDICT_ORDER[1:]:
            raise ClientError(f"--fail-on must be suspicious or backdoored, got {self.fail_on!r}")
        if self.max_anomaly_index is not None and not self.max_anomaly_index >= 0:
            raise ClientError(f"--max-anomaly-index must be a non-negative number, got {self.max_anomaly_index}")

    def check(self, report: dict[str, Any]) -> list[str]:
        """The reasons the gate fails (empty when it passes), judged on the model the client will ship."""
        result = report.get("after") or report["before"]
        failures = self._check_verdict(report)
        if self.max_asr is not None:
            asr = result.get("asr")
            if asr is None:
                failures.append("ASR was not measured (give --poisoned-data or --attack) but --max-asr was set")
            elif asr > self.max_asr:
                failures.append(f"ASR {asr:.4f} > --max-asr {self.max_asr}")
        if self.min_acc is not None and result["acc"] < self.min_acc:
            failures.append(f"ACC {result['acc']:.4f} < --min-acc {self.min_acc}")
        return failures

    def _check_verdict(self, report: dict[str, Any]) -> list[str]:
        if self.fail_on is None and self.max_anomaly_index is None:
            return []
        verdict = shipped_verdict(report)
        label = verdict_label(verdict) if verdict else None
        if verdict is None or label is None:
            why = (verdict or {}).get("reason") or "the report has no detector verdict"
            flags = " and ".join(f for f, v in (("--fail-on", self.fail_on),
                                                ("--max-anomaly-index", self.max_anomaly_index)) if v is not None)
            return [f"no verdict to gate on ({why}) but {flags} was set"]
        failures = []
        targets = suspected_targets(verdict)
        if self.fail_on is not None and VERDICT_ORDER.index(label) >= VERDICT_ORDER.index(self.fail_on):
            failures.append(f"verdict {label} (suspected targets {targets}) with --fail-on {self.fail_on}")
        if self.max_anomaly_index is not None:
            index = max_anomaly_index(verdict)
            if index is None:
                failures.append("the Neural Cleanse anomaly index is not in the verdict but --max-anomaly-index "
                                "was set")
            elif index > self.max_anomaly_index:
                failures.append(f"anomaly index {index:.2f} > --max-anomaly-index {self.max_anomaly_index}")
        return failures


def submit(url: str, api_key: str, spec: dict[str, Any], files: dict[str, Path], timeout: float = 600) -> str:
    """POST /scans; returns the scan id."""
    with ExitStack() as stack, httpx.Client(base_url=url, timeout=timeout) as http:
        parts = {name: (path.name, stack.enter_context(open(path, "rb")), "application/octet-stream")
                 for name, path in files.items()}
        response = http.post("/scans", headers=_auth(api_key), data={"spec": json.dumps(spec)}, files=parts)
    if response.status_code != 202:
        raise ClientError(f"upload refused ({response.status_code}): {_detail(response)}", _findings(response))
    return str(response.json()["id"])


def wait(url: str, api_key: str, scan_id: str, timeout_s: float, console: Console) -> dict[str, Any]:
    """Poll until the scan ends, drawing its progress; returns the final status body."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=30) as http, Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as bar:
        task = bar.add_task("queued", total=1.0)
        while True:
            r = http.get(f"/scans/{scan_id}", headers=_auth(api_key))
            if r.status_code != 200:
                raise ClientError(f"GET /scans/{scan_id} answered {r.status_code}: {_detail(r)}")
            body = r.json()
            bar.update(task, completed=body["progress"], description=body["stage"] or body["status"])
            if body["status"] in ("succeeded", "failed", "canceled"):
                return body
            if time.monotonic() > deadline:
                raise ClientError(f"scan {scan_id} did not finish within {timeout_s:.0f} s")
            time.sleep(1.0)


def fetch_report(url: str, api_key: str, scan_id: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/scans/{scan_id}/report", headers=_auth(api_key), timeout=30)
    if r.status_code != 200:
        raise ClientError(f"report unavailable ({r.status_code}): {_detail(r)}")
    return r.json()


def download_artifact(url: str, api_key: str, scan_id: str, name: str, dest: Path) -> None:
    with httpx.stream("GET", f"{url}/scans/{scan_id}/artifacts/{name}", headers=_auth(api_key), timeout=300) as r:
        if r.status_code != 200:
            r.read()
            raise ClientError(f"artifact {name} unavailable ({r.status_code}): {_detail(r)}")
        with open(dest, "wb") as f:
            for chunk in r.iter_bytes():
                f.write(chunk)


def page_link(url: str, api_key: str, scan_id: str | None) -> str:
    """A signed, short-lived URL of a scan's report page (or of the scans page when ``scan_id`` is None)."""
    path = f"/scans/{scan_id}/links" if scan_id else "/scans/links"
    r = httpx.post(f"{url}{path}", headers=_auth(api_key), timeout=30)
    if r.status_code != 201:
        raise ClientError(f"no link ({r.status_code}): {_detail(r)}")
    try:
        link = r.json()["url"]
    except (ValueError, TypeError, KeyError) as exc:  # not JSON, not an object, no url
        raise ClientError(f"the server's answer holds no link: {r.text[:200]!r}") from exc
    # the link is opened in the user's browser: only a web page, never file:, javascript: or another scheme
    if not isinstance(link, str) or urlsplit(link).scheme not in ("http", "https") or not urlsplit(link).netloc:
        raise ClientError(f"the server's link is no http(s) URL: {str(link)[:200]!r}")
    return link


def summary_lines(report: dict[str, Any]) -> list[str]:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    lines = [f"model {report['model']['architecture']} sha256 {report['model']['sha256'][:16]}…",
             f"ACC measured on {report['data']['acc_source']} ({report['data']['acc_images']} images)"]
    for when in ("before", "after"):
        if when in report:
            r = report[when]
            lines.append(f"{when:>6}: ACC {pct(r['acc'])}  ASR {pct(r['asr'])}  RA {pct(r['ra'])}")
    for key, verdict in (("verdict", report.get("verdict")),
                         ("after verdict", (report.get("after") or {}).get("verdict"))):
        if isinstance(verdict, dict) and verdict_label(verdict):
            lines.append(f"{key}: {verdict_label(verdict)}  suspected targets {suspected_targets(verdict)}")
            lines.extend(detector_lines(verdict))
    if "repair" in report:
        lines.append(f"repair: {report['repair']['method']} {json.dumps(report['repair'].get('params', {}))[:200]}")
    if isinstance(report.get("repair_data"), dict):
        rd = report["repair_data"]
        lines.append(f"repair_data: {rd.get('method')}: {rd.get('n_flagged')} of {rd.get('training_images')} "
                     f"training samples flagged, {rd.get('n_relabelled')} relabelled, {rd.get('n_dropped')} dropped"
                     + (f", {rd['n_input_flagged']} flagged for their input" if rd.get("n_input_flagged") else ""))
        quality = rd.get("identification")
        if isinstance(quality, dict):
            lines.append(f"identification vs is_corrupt: precision {pct(quality.get('precision'))}  recall "
                         f"{pct(quality.get('recall'))}  AUROC {_num(quality.get('auroc'))}")
    lines.append("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.get("timings", {}).items()))
    return lines


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _findings(response: httpx.Response) -> list[dict[str, Any]] | None:
    try:
        found = response.json().get("findings")
    except Exception:  # noqa: BLE001 - not JSON
        return None
    return found if isinstance(found, list) else None


MAX_DETAIL_CHARS = 2000  # of a server's error message printed (a hostile or broken server may send megabytes)


def _detail(response: httpx.Response) -> str:
    try:
        detail = str(response.json().get("detail"))
    except Exception:  # noqa: BLE001 - not JSON
        return response.text[:500]
    return detail if len(detail) <= MAX_DETAIL_CHARS else f"{detail[:MAX_DETAIL_CHARS]}… ({len(detail)} characters)"
