"""cli/sarif.py: every verdict, gate failure and file finding becomes a schema-valid SARIF 2.1.0 result."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from cli.sarif import SCHEMA_PATH, build_sarif

_SCHEMA = json.loads(SCHEMA_PATH.read_text())
_FINDING = {"rule_id": "AD101", "severity": "high", "message": "imports posix.system",
            "location": {"member": "m/data.pkl", "offset": 190}}


@pytest.mark.parametrize("verdict, level", [({"label": "backdoored", "anomaly_index": 4.2}, "error"),
                                            ({"label": "clean"}, "note"), ("suspicious", "error")])
def test_verdict_gate_and_findings_are_results(verdict: object, level: str) -> None:
    report = {"verdict": verdict, "file_findings": [_FINDING, {**_FINDING, "rule_id": "AD201", "severity": "medium"}]}
    log = build_sarif(Path("models/m.pt"), report, ["ASR 0.9 > --max-asr 0.2"])
    jsonschema.validate(log, _SCHEMA)
    results = log["runs"][0]["results"]
    assert [(r["ruleId"], r["level"]) for r in results] == [
        ("ANTIDOTE-VERDICT", level), ("ANTIDOTE-GATE", "error"), ("AD101", "error"), ("AD201", "warning")]
    assert "byte 190" in results[2]["message"]["text"]
    rules = {r["id"]: r for r in log["runs"][0]["tool"]["driver"]["rules"]}
    assert set(rules) == {"ANTIDOTE-VERDICT", "ANTIDOTE-GATE", "AD101", "AD201"}
    assert all(r["help"]["text"] for r in rules.values())


def test_schema_rejects_a_broken_log() -> None:
    log = build_sarif(Path("m.pt"), None, [], [_FINDING])
    log["runs"][0]["results"][0]["level"] = "fatal"  # not a SARIF level: the shipped schema must catch it
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(log, _SCHEMA)
