"""The CI examples in examples/ hold together: the YAML parses into the structure GitHub Actions and GitLab CI
expect, every `antidote` command they run parses against the real CLI (each option listed in its --help,
each value of the option's type), the files it writes are the ones uploaded or kept, and the exit codes they
branch on are the client's documented ones."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from typer.exceptions import TyperException
from typer.testing import CliRunner

from cli import client
from cli.main import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ACTION = re.compile(r"^[\w.-]+/[\w./-]+@v\d+$")  # owner/repo[/path]@vN


def _load(name: str) -> dict[Any, Any]:
    data = yaml.safe_load((EXAMPLES / name).read_text())
    assert isinstance(data, dict), name
    return data


def _antidote_commands(script: str) -> list[list[str]]:
    """The `antidote ...` command lines of a shell script, backslash continuations joined, split like sh."""
    joined = re.sub(r"\\\n\s*", " ", script)
    return [shlex.split(line.strip()) for line in joined.splitlines() if line.strip().startswith("antidote ")]


def _check_command(argv: list[str]) -> dict[str, Any]:
    """Parse ``argv`` (``antidote SUB ...``) with the real CLI; returns the parsed parameters."""
    assert argv[0] == "antidote", argv
    command = typer.main.get_command(app).commands.get(argv[1])  # type: ignore[attr-defined]
    assert command is not None, f"no `antidote {argv[1]}` command"
    helped = CliRunner().invoke(app, [argv[1], "--help"], env={"COLUMNS": "250", "TERM": "dumb"})
    assert helped.exit_code == 0, helped.output
    for token in argv[2:]:
        if token.startswith("--"):
            option = token.split("=", 1)[0]
            assert option in helped.output, f"`antidote {argv[1]} --help` does not list {option}"
    ctx = command.make_context(argv[1], argv[2:])  # types, required options and unknown ones, as at run time
    return dict(ctx.params)


def _pip_requirement(script: str) -> str:
    match = re.search(r'pip install "([^"]+)"', script)
    assert match, script
    return match.group(1)


def test_the_github_workflow_runs_a_real_command_and_uploads_what_it_writes() -> None:
    wf = _load("github-actions.yml")
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers and set(triggers) <= {"push", "pull_request", "workflow_dispatch", "schedule"}
    assert wf["permissions"]["security-events"] == "write"  # what upload-sarif needs
    (job,) = wf["jobs"].values()
    steps = job["steps"]
    assert job["runs-on"] and all(("uses" in s) != ("run" in s) for s in steps), steps
    assert all(ACTION.match(s["uses"]) for s in steps if "uses" in s)
    assert _pip_requirement(next(s["run"] for s in steps if "pip install" in s.get("run", ""))).startswith(
        "antidote @ ")
    scan = next(s for s in steps if s.get("id") == "scan")
    assert {"ANTIDOTE_URL", "ANTIDOTE_API_KEY"} <= set(scan["env"])  # the client's envvars (cli/main.py Url, Key)
    (argv,) = _antidote_commands(scan["run"])
    params = _check_command(argv)
    assert str(params["sarif"]) == "antidote.sarif" and params["report"] is not None
    assert 'echo "code=$code" >> "$GITHUB_OUTPUT"' in scan["run"] and "code=$?" in scan["run"]
    upload = next(s for s in steps if s.get("uses", "").startswith("github/codeql-action/upload-sarif@"))
    assert upload["with"]["sarif_file"] == str(params["sarif"])
    assert "always()" in upload["if"] and f"hashFiles('{params['sarif']}')" in upload["if"]
    assert steps.index(scan) < steps.index(upload)
    gate = steps[-1]["run"]
    assert "steps.scan.outputs.code" in gate
    branches = dict(re.findall(r"^\s*(\S+)\)\s*(.*?);;", gate, re.M))
    assert set(branches) == {str(client.PASS), str(client.GATE_FAILED), "*"}
    assert "exit" not in branches[str(client.PASS)] and f"exit {client.GATE_FAILED}" in branches["1"]
    assert f"exit {client.ERROR}" in branches["*"]


def test_the_gitlab_job_runs_a_real_command_and_keeps_what_it_writes() -> None:
    ci = _load("gitlab-ci.yml")
    jobs = {name: job for name, job in ci.items() if isinstance(job, dict) and "script" in job}
    assert list(jobs) == ["antidote-scan"]
    job = jobs["antidote-scan"]
    assert job["image"].startswith("python:") and job["stage"] in ("build", "test", "deploy")
    script = "\n".join(job["script"])
    assert _pip_requirement(script).startswith("antidote @ ")
    (argv,) = _antidote_commands(script)
    params = _check_command(argv)
    assert job["artifacts"]["when"] == "always"
    assert {str(params["sarif"]), str(params["report"])} <= set(job["artifacts"]["paths"])


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_the_examples_state_the_clients_exit_codes(name: str) -> None:
    header = (EXAMPLES / name).read_text()
    assert (f"{client.PASS} the gate passed, {client.GATE_FAILED} the gate failed, {client.ERROR} an error"
            in " ".join(line.lstrip("# ") for line in header.splitlines()))


def test_a_wrong_option_would_be_caught() -> None:
    """The check itself can fail: an option the CLI lacks, and a value of the wrong type."""
    with pytest.raises(AssertionError, match="--max-accuracy"):
        _check_command(shlex.split("antidote scan --model m --clean-data c --max-accuracy 0.2"))
    with pytest.raises(TyperException, match="valid number"):
        _check_command(shlex.split("antidote scan --model m --clean-data c --max-asr high"))
