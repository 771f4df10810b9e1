"""``antidote scan --sarif`` against a running ``antidote serve``: the SARIF validates against the shipped
2.1.0 schema, and the exit codes are 0 (pass), 1 (gate failed), 2 (error: a refused code-carrying model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest
import torch

from cli.sarif import SCHEMA_PATH
from tests.e2e.test_embedded import Server, _cli, _spec_file, server  # noqa: F401 - the fixture
from tests.helpers import backdoored_digits, write_npz


class _System:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.canary}",))


def _valid(path: Path) -> dict:
    log = json.loads(path.read_text())
    jsonschema.validate(log, json.loads(SCHEMA_PATH.read_text()))
    return log


@pytest.mark.timeout(900)
def test_sarif_and_exit_codes(server: Server, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    key = _cli("keys", "create", "--tenant", "sarif", data_dir=server.data_dir).stdout.strip()
    state, clean, test = backdoored_digits()
    model = tmp_path / "m.pt"
    torch.save(state, model)
    base = ["scan", "--model", str(model), "--clean-data", str(write_npz(tmp_path / "c.npz", clean)),
            "--test-data", str(write_npz(tmp_path / "t.npz", test)), "--spec", str(_spec_file(tmp_path)),
            "--attack", "badnets", "--target", "0", "--url", server.url]

    failed = _cli(*base, "--max-asr", "0.2", "--sarif", str(tmp_path / "gate.sarif"), data_dir=server.data_dir,
                  api_key=key)
    assert failed.returncode == 1, failed.stderr
    log = _valid(tmp_path / "gate.sarif")
    results = log["runs"][0]["results"]
    assert any(r["ruleId"] == "ANTIDOTE-GATE" and r["level"] == "error" for r in results)
    assert any(r["ruleId"] == "AD001" and r["level"] == "note" for r in results)  # the file's imports
    assert {r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in results} == {model.as_posix()}

    passed = _cli(*base, "--max-asr", "1.0", "--sarif", str(tmp_path / "pass.sarif"), data_dir=server.data_dir,
                  api_key=key)
    assert passed.returncode == 0, passed.stderr
    assert not [r for r in _valid(tmp_path / "pass.sarif")["runs"][0]["results"] if r["level"] == "error"]

    canary = tmp_path / "canary"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "x": _System(canary)}, evil)
    refused = _cli(*[str(evil) if a == str(model) else a for a in base], "--sarif", str(tmp_path / "evil.sarif"),
                   data_dir=server.data_dir, api_key=key)
    assert refused.returncode == 2 and "422" in refused.stderr, refused.stderr
    results = _valid(tmp_path / "evil.sarif")["runs"][0]["results"]
    assert any(r["ruleId"] == "AD101" and r["level"] == "error" and "system" in r["message"]["text"]
               for r in results)
    assert not canary.exists()
