"""schemathesis over the OpenAPI spec against a running ``antidote serve``: no server error, and every answer
(status, content type, headers, body) as the spec documents it. A bounded run; the long one is
``python -m bench.schemathesis_run`` (bench/results/schemathesis.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("schemathesis")

from bench.schemathesis_run import run_schemathesis, seed_scan, start_server, write_config  # noqa: E402


@pytest.mark.timeout(240)
def test_the_api_answers_as_its_openapi_spec_says(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        ids = [seed_scan(server, tmp_path)]
        outcome = run_schemathesis(server, write_config(tmp_path / "schemathesis.toml", ids), max_examples=10)
        log = server.log.read_text()
    finally:
        server.stop()
    assert outcome.cases > 100, outcome.output[-3000:]
    assert outcome.returncode == 0 and outcome.failures == 0, outcome.output[-6000:]
    assert "Exception in ASGI application" not in log and "unhandled error" not in log, log[-3000:]
