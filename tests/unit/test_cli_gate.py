"""The CI client's detector gate: --fail-on and --max-anomaly-index on report verdicts, and its messages."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from cli import client
from cli.main import app


def _report(label: str | None, index: float | None = 1.0, after: str | None = None) -> dict[str, Any]:
    verdict = None if label is None else {
        "verdict": label, "suspected_targets": [0] if label != "clean" else [],
        "evidence": {"detectors": {"neural_cleanse": {"anomaly_index": index}}}}
    report: dict[str, Any] = {"before": {"acc": 0.9, "asr": None, "ra": None}, "verdict": verdict}
    if after is not None:
        report["after"] = {"acc": 0.88, "asr": None, "ra": None, "verdict": {"verdict": after}}
    return report


@pytest.mark.parametrize(("label", "fail_on", "fails"), [
    ("clean", "suspicious", False), ("suspicious", "suspicious", True), ("backdoored", "suspicious", True),
    ("clean", "backdoored", False), ("suspicious", "backdoored", False), ("backdoored", "backdoored", True),
])
def test_fail_on_fails_at_that_verdict_or_worse(label: str, fail_on: str, fails: bool) -> None:
    failures = client.Gate(fail_on=fail_on).check(_report(label))
    assert bool(failures) is fails
    if fails:
        assert label in failures[0] and "[0]" in failures[0]


def test_max_anomaly_index_reads_neural_cleanse_evidence() -> None:
    assert client.Gate(max_anomaly_index=3.0).check(_report("suspicious", index=2.5)) == []
    (failure,) = client.Gate(max_anomaly_index=2.0).check(_report("suspicious", index=2.5))
    assert "2.50 > --max-anomaly-index 2.0" in failure
    (failure,) = client.Gate(max_anomaly_index=2.0).check(_report("clean", index=None))
    assert "not in the verdict" in failure


def test_a_report_without_a_verdict_fails_only_when_the_flags_are_given() -> None:
    assert client.Gate().check(_report(None)) == []
    (failure,) = client.Gate(fail_on="backdoored").check(_report(None))
    assert "no verdict" in failure and "--fail-on" in failure
    skipped = {"before": {"acc": 0.9}, "verdict": {"skipped": True, "reason": "detect.enabled is false"}}
    (failure,) = client.Gate(fail_on="backdoored", max_anomaly_index=2).check(skipped)
    assert "detect.enabled is false" in failure and "--max-anomaly-index" in failure


def test_repair_gates_on_the_repaired_models_verdict() -> None:
    assert client.Gate(fail_on="suspicious").check(_report("backdoored", after="clean")) == []
    assert client.Gate(fail_on="suspicious").check(_report("clean", after="suspicious"))


def test_bad_gate_options_are_errors_with_exit_code_2() -> None:
    with pytest.raises(client.ClientError):
        client.Gate(fail_on="clean")
    result = CliRunner().invoke(app, ["scan", "--model", "m.pt", "--clean-data", "c.npz", "--fail-on", "maybe",
                                      "--api-key", "k"])
    assert result.exit_code == client.ERROR
    assert "--fail-on must be suspicious or backdoored" in result.output


def test_repair_data_method_goes_to_its_own_section_and_the_summary_counts_the_flags() -> None:
    from cli.main import _build_spec

    spec = _build_spec("repair_data", "resnet20", 10, 1, None, 0, None, "drop_flagged")
    assert spec["repair_data"] == {"method": "drop_flagged", "params": {}} and "repair" not in spec
    assert _build_spec("repair", "resnet20", 10, 1, None, 0, None, "finetune")["repair"]["method"] == "finetune"
    report = {"model": {"architecture": "resnet20", "sha256": "ab" * 32},
              "data": {"acc_source": "test_data", "acc_images": 10},
              "before": {"acc": 0.5, "asr": None, "ra": None}, "after": {"acc": 0.75, "asr": None, "ra": None},
              "repair_data": {"method": "retain", "training_images": 400, "n_flagged": 37, "n_relabelled": 21,
                              "n_dropped": 4, "identification": {"precision": 0.75, "recall": 0.5, "auroc": 0.875}},
              "timings": {}}
    lines = client.summary_lines(report)
    assert "repair_data: retain: 37 of 400 training samples flagged, 21 relabelled, 4 dropped" in lines
    assert "identification vs is_corrupt: precision 75.00%  recall 50.00%  AUROC 0.875" in lines
    assert client.Gate(min_acc=0.7).check(report) == []  # judged on the repaired model


def test_the_summary_shows_every_detector_with_its_role_and_its_suspects() -> None:
    """An evidence-only detector may point elsewhere than the verdict (the demo: UP votes for 2, the feature
    inversion suspects 0): the summary shows both, and a skipped detector says why."""
    verdict = {"label": "suspicious", "suspected_targets": [2], "evidence": {"detectors": {
        "universal_perturbation": {"p_value": 0.0194, "votes": True, "suspected_targets": [2]},
        "feature_inversion": {"p_value": 0.0293, "votes": False, "suspected_targets": [0]},
        "untargeted": {"p_value": 1.0, "votes": False, "suspected_targets": [],
                       "skipped": "no 4-D feature map"}}}}
    report = {"model": {"architecture": "resnet20", "sha256": "ab" * 32},
              "data": {"acc_source": "test_data", "acc_images": 10},
              "before": {"acc": 0.5, "asr": None, "ra": None}, "verdict": verdict, "timings": {}}
    lines = client.summary_lines(report)
    assert "verdict: suspicious  suspected targets [2]" in lines
    assert "  universal_perturbation (votes): p 0.0194, suspects [2]" in lines
    assert "  feature_inversion (evidence): p 0.0293, suspects [0]" in lines
    assert "  untargeted (evidence): skipped: no 4-D feature map" in lines


@pytest.mark.parametrize(("content", "says"), [
    (b"[1, 2]", "must hold a JSON object"),
    (b"null", "must hold a JSON object"),
    (b'{"repair": "tsbd"}', "repair must be a JSON object"),
    (b"\xff\xfe{", "--spec: 'utf-8' codec can't decode"),
    (b"{" + b" " * (64 * 1024) + b"}", "over the API's limit of 65536"),
])
def test_a_bad_spec_file_is_an_error_naming_it_before_any_upload(tmp_path: Any, content: bytes, says: str) -> None:
    """Before: a list, null or a string section crashed _build_spec with a TypeError/AttributeError that named no
    option, and a spec file of any size was read whole."""
    spec = tmp_path / "spec.json"
    spec.write_bytes(content)
    # an unreachable URL: the error must come before any request
    result = CliRunner().invoke(app, ["repair", "--model", "m.pt", "--clean-data", "c.npz", "--spec", str(spec),
                                      "--method", "tsbd", "--api-key", "k", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == client.ERROR
    assert says in " ".join(result.output.split()), result.output
    assert "TypeError" not in result.output and "AttributeError" not in result.output


def test_server_text_is_printed_verbatim_never_read_as_markup(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the API's 415 quoting the file's suffix '.[/x]' raised rich's MarkupError inside the error handler:
    no message, and exit 1, the code of a failed gate; '[bold]' in a message vanished."""
    detail = "upload refused (415): unsupported data format '.[/x]'; and '[bold]b[/bold]'"

    def refused(*args: Any, **kwargs: Any) -> str:
        raise client.ClientError(detail)

    monkeypatch.setattr(client, "submit", refused)
    (tmp_path / "m.pt").write_bytes(b"m")
    (tmp_path / "c.[").write_bytes(b"c")
    result = CliRunner().invoke(app, ["scan", "--model", str(tmp_path / "m.pt"), "--clean-data", str(tmp_path / "c.["),
                                      "--architecture", "resnet20", "--num-classes", "10", "--api-key", "k"])
    assert result.exit_code == client.ERROR, result.exception
    assert detail in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(("status", "body", "says"), [
    (201, b'{"url": "file:///etc/passwd"}', "no http(s) URL"),
    (201, b'{"url": "javascript:alert(1)"}', "no http(s) URL"),
    (201, b"<html>not json</html>", "holds no link"),
    (201, b'["http://x"]', "holds no link"),
    (500, b'{"detail": "' + b"x" * 100_000 + b'"}', "(100000 characters)"),
])
def test_a_hostile_or_broken_servers_link_is_an_error_and_never_opened(
        monkeypatch: pytest.MonkeyPatch, status: int, body: bytes, says: str) -> None:
    """`antidote open` put whatever the server's "url" said into the browser (file:, javascript:), crashed with a
    traceback on a non-JSON answer and printed a 100 KB error message whole. A real HTTP server on loopback."""
    import http.server
    import threading
    import webbrowser

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", opened.append)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = CliRunner().invoke(app, ["open", "--url", f"http://127.0.0.1:{server.server_port}",
                                          "--api-key", "k"])
    finally:
        server.shutdown()
    assert result.exit_code == client.ERROR, (result.output, result.exception)
    assert says in result.output and len(result.output) < 3000, result.output[:500]
    assert opened == []
