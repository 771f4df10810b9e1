"""The ``antidote`` command: serve, worker, keys, migrate, and the CI client (scan, repair, repair-data), plus a
demo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from cli import client
from cli.sarif import build_sarif, write_sarif
from store.logs import configure_logging
from store.settings import get_settings

app = typer.Typer(help="Antidote: scan and repair backdoored image classifiers.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
keys = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(keys, name="keys")
err = Console(stderr=True)


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8000,
          workers: Annotated[int, typer.Option(min=1, help="API processes (uvicorn workers)")] = 1) -> None:
    """The API and a worker on the embedded default (SQLite, a folder broker, local files under
    ANTIDOTE_DATA_DIR), or just the API when ANTIDOTE_BROKER_URL names a broker. With --workers N the API
    runs in N processes; the embedded default still starts exactly one Celery worker."""
    from cli.serve import serve as run

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    run(settings, host, port, workers)


@app.command()
def worker(concurrency: int = 1) -> None:
    """A Celery worker on the configured broker and queue (one per GPU)."""
    from cli.serve import worker_command

    os.execv(sys.executable, worker_command(get_settings(), concurrency))


@app.command()
def migrate() -> None:
    """Apply the database migrations (Alembic) to ANTIDOTE_DATABASE_URL."""
    from store.db import upgrade_database

    upgrade_database(get_settings().resolved_database_url)


@keys.command("create")
def keys_create(tenant: Annotated[str, typer.Option(help="tenant name; created if new")]) -> None:
    """Print one new API key for TENANT on stdout, nothing else."""
    from store import repository
    from store.db import make_engine, make_session_factory, upgrade_database

    settings = get_settings()
    if settings.database_url is None:  # the embedded database may not exist yet
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade_database(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        typer.echo(repository.create_api_key(session, tenant.strip() or "default"))


@keys.command("webhook-secret")
def keys_webhook_secret(tenant: Annotated[str, typer.Option(help="tenant name")],
                        rotate: Annotated[bool, typer.Option(help="replace the secret by a new one")] = False) -> None:
    """Print TENANT's webhook signing secret on stdout (made on first use; --rotate replaces it at once)."""
    from store import webhooks
    from store.db import make_engine, make_session_factory, upgrade_database

    settings = get_settings()
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade_database(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        secret = webhooks.secret_for_tenant_name(session, tenant.strip(), rotate)
    if secret is None:
        typer.echo(f"no tenant {tenant!r}; create it with `antidote keys create --tenant {tenant}`", err=True)
        raise typer.Exit(2)
    typer.echo(secret)


def _client_run(mode: str, model: Path, clean_data: Path, architecture: str | None, num_classes: int | None,
                in_channels: int, test_data: Path | None, poisoned_data: Path | None, attack: str | None,
                target: int, spec_file: Path | None, method: str | None, url: str, api_key: str | None,
                report_path: Path | None, out: Path | None, gate: client.Gate, timeout: float,
                sarif: Path | None = None, training_data: Path | None = None,
                scores_out: Path | None = None) -> None:
    # the server's and the report's text is printed as it is, never read as rich markup: a message quoting
    # "[/x]" raised MarkupError inside the error handler (exit 1, the gate's code, and no message)
    console = Console(stderr=True)
    try:
        if not api_key:
            raise client.ClientError("no API key: pass --api-key or set ANTIDOTE_API_KEY")
        spec = _build_spec(mode, architecture, num_classes, in_channels, attack, target, spec_file, method)
        files = {"model": model, "clean_data": clean_data}
        files.update({k: v for k, v in (("test_data", test_data), ("poisoned_data", poisoned_data),
                                        ("training_data", training_data)) if v})
        for name, path in files.items():
            if not path.is_file():
                raise client.ClientError(f"--{name.replace('_', '-')}: no file {path}")
        scan_id = client.submit(url, api_key, spec, files)
        console.print(f"scan {scan_id} queued", markup=False)
        final = client.wait(url, api_key, scan_id, timeout, console)
        if final["status"] != "succeeded":
            error = final.get("error") or {}
            raise client.ClientError(f"scan {scan_id} {final['status']}: {error.get('code')}: {error.get('message')}")
        report = client.fetch_report(url, api_key, scan_id)
        if report_path:
            report_path.write_text(json.dumps(report, indent=2))
        if out is not None:
            client.download_artifact(url, api_key, scan_id, "repaired_model", out)
            console.print(f"repaired weights written to {out}", markup=False)
        if scores_out is not None:
            client.download_artifact(url, api_key, scan_id, "sample_scores", scores_out)
            console.print(f"per-sample scores written to {scores_out}", markup=False)
        for line in client.summary_lines(report):
            console.print(line, markup=False)
        failures = gate.check(report)
    except client.ClientError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        if sarif is not None and exc.findings is not None:  # a refused checkpoint: what it would have run
            write_sarif(sarif, build_sarif(model, None, [], exc.findings))
        raise typer.Exit(client.ERROR) from exc
    except Exception as exc:  # network errors and the like: still an error, never a gate verdict
        console.print(f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))}")
        raise typer.Exit(client.ERROR) from exc
    if sarif is not None:
        write_sarif(sarif, build_sarif(model, report, failures))
    for failure in failures:
        console.print(f"[red]gate failed:[/red] {escape(failure)}")
    if not failures:
        console.print("[green]gate passed[/green]")
    raise typer.Exit(client.GATE_FAILED if failures else client.PASS)


SPEC_FILE_MAX_BYTES = 64 * 1024  # the API's bound on the spec part (api/uploads.py SPEC_MAX_BYTES)


def _build_spec(mode: str, architecture: str | None, num_classes: int | None, in_channels: int,
                attack: str | None, target: int, spec_file: Path | None, method: str | None) -> dict[str, Any]:
    if spec_file is not None:
        try:
            size = spec_file.stat().st_size
            if size > SPEC_FILE_MAX_BYTES:  # the API refuses it anyway: do not read a huge file to send it
                raise client.ClientError(f"--spec: {spec_file} is {size} bytes, over the API's limit of "
                                         f"{SPEC_FILE_MAX_BYTES} for the spec")
            spec = json.loads(spec_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
            raise client.ClientError(f"--spec: {exc}") from exc
        if not isinstance(spec, dict):
            raise client.ClientError(f"--spec: {spec_file} must hold a JSON object (docs/api.md), got "
                                     f"{type(spec).__name__}")
    else:
        if not architecture or not num_classes:
            raise client.ClientError("give --spec FILE, or --architecture and --num-classes")
        spec = {"model": {"architecture": architecture, "num_classes": num_classes, "in_channels": in_channels}}
    spec["mode"] = mode
    if attack:
        spec["attack"] = {"type": attack, "target": target}
    if method:  # the section of the mode: repair's backdoor repair, or repair_data's data repair
        section = "repair_data" if mode == "repair_data" else "repair"
        given = spec.get(section, {})
        if not isinstance(given, dict):
            raise client.ClientError(f"--spec: {section} must be a JSON object, got {type(given).__name__}")
        spec[section] = {"method": method, "params": given.get("params", {})}
    return spec


FailOn = Annotated[str | None, typer.Option(
    help="fail the gate when the detector's verdict is this or worse: suspicious or backdoored")]
MaxIndex = Annotated[float | None, typer.Option(
    help="fail the gate when Neural Cleanse's classic anomaly index exceeds this (evidence; ~3.9 is a 5% level "
         "for 10 classes)")]


def _gate(max_asr: float | None, min_acc: float | None, fail_on: str | None,
          max_anomaly_index: float | None) -> client.Gate:
    """The gate, or exit 2 on a bad gate option (an argument error, never a verdict)."""
    try:
        return client.Gate(max_asr, min_acc, fail_on, max_anomaly_index)
    except client.ClientError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(client.ERROR) from exc


Url = Annotated[str, typer.Option(envvar="ANTIDOTE_URL", help="the Antidote API")]
Key = Annotated[str | None, typer.Option(envvar="ANTIDOTE_API_KEY", help="API key")]
Sarif = Annotated[Path | None, typer.Option(help="write the findings as SARIF 2.1.0 here (code scanning)")]


@app.command()
def scan(
    model: Annotated[Path, typer.Option(help="checkpoint: .safetensors, .pt/.pth/.bin, BackdoorBench result")],
    clean_data: Annotated[Path, typer.Option(help=".npz or .zip image folder")],
    architecture: str | None = None, num_classes: int | None = None, in_channels: int = 3,
    test_data: Path | None = None, poisoned_data: Path | None = None,
    attack: Annotated[str | None, typer.Option(help="built-in trigger for ASR, e.g. badnets")] = None,
    target: int = 0, spec: Annotated[Path | None, typer.Option(help="a spec JSON file")] = None,
    url: Url = "http://127.0.0.1:8000", api_key: Key = None,
    report: Annotated[Path | None, typer.Option(help="write the report JSON here")] = None,
    max_asr: float | None = None, min_acc: float | None = None, fail_on: FailOn = None,
    max_anomaly_index: MaxIndex = None, timeout: float = 3600, sarif: Sarif = None,
) -> None:
    """Scan a model; exit 0 if the gate passes, 1 if it fails, 2 on error."""
    _client_run("scan", model, clean_data, architecture, num_classes, in_channels, test_data, poisoned_data,
                attack, target, spec, None, url, api_key, report, None,
                _gate(max_asr, min_acc, fail_on, max_anomaly_index), timeout, sarif=sarif)


@app.command()
def repair(
    model: Annotated[Path, typer.Option(help="checkpoint: .safetensors, .pt/.pth/.bin, BackdoorBench result")],
    clean_data: Annotated[Path, typer.Option(help=".npz or .zip image folder")],
    architecture: str | None = None, num_classes: int | None = None, in_channels: int = 3,
    test_data: Path | None = None, poisoned_data: Path | None = None,
    attack: str | None = None, target: int = 0, spec: Path | None = None, method: str | None = None,
    url: Url = "http://127.0.0.1:8000", api_key: Key = None, report: Path | None = None,
    out: Annotated[Path | None, typer.Option(help="write the repaired .safetensors here")] = None,
    max_asr: float | None = None, min_acc: float | None = None, fail_on: FailOn = None,
    max_anomaly_index: MaxIndex = None, timeout: float = 3600, sarif: Sarif = None,
) -> None:
    """Repair a model and gate the repaired one; exit 0 pass, 1 gate failed, 2 error."""
    _client_run("repair", model, clean_data, architecture, num_classes, in_channels, test_data, poisoned_data,
                attack, target, spec, method, url, api_key, report, out,
                _gate(max_asr, min_acc, fail_on, max_anomaly_index), timeout, sarif=sarif)


@app.command("repair-data")
def repair_data(
    model: Annotated[Path, typer.Option(help="checkpoint: .safetensors, .pt/.pth/.bin, BackdoorBench result")],
    clean_data: Annotated[Path, typer.Option(help="the trusted clean set: .npz or .zip image folder")],
    training_data: Annotated[Path, typer.Option(help="the training data to search for harmful samples: .npz "
                                                     "(optionally with an is_corrupt mask) or .zip")],
    architecture: str | None = None, num_classes: int | None = None, in_channels: int = 3,
    test_data: Path | None = None, poisoned_data: Path | None = None,
    attack: str | None = None, target: int = 0, spec: Path | None = None,
    method: Annotated[str | None, typer.Option(help="data-repair method; default: the server's")] = None,
    url: Url = "http://127.0.0.1:8000", api_key: Key = None, report: Path | None = None,
    out: Annotated[Path | None, typer.Option(help="write the repaired .safetensors here")] = None,
    scores_out: Annotated[Path | None, typer.Option(help="write the per-sample CSV (score, flag, new label) "
                                                         "here")] = None,
    max_asr: float | None = None, min_acc: float | None = None, fail_on: FailOn = None,
    max_anomaly_index: MaxIndex = None, timeout: float = 3600, sarif: Sarif = None,
) -> None:
    """Find the harmful samples of the training data with the clean set and repair the model; gate the repaired
    one: exit 0 pass, 1 gate failed, 2 error."""
    _client_run("repair_data", model, clean_data, architecture, num_classes, in_channels, test_data,
                poisoned_data, attack, target, spec, method, url, api_key, report, out,
                _gate(max_asr, min_acc, fail_on, max_anomaly_index), timeout, sarif=sarif,
                training_data=training_data, scores_out=scores_out)


@app.command("open")
def open_page(scan_id: Annotated[str | None, typer.Argument(help="a scan; none: the scans page")] = None,
              url: Url = "http://127.0.0.1:8000", api_key: Key = None,
              browser: Annotated[bool, typer.Option(help="open it in the web browser")] = True) -> None:
    """Print a signed link to a scan's HTML report (or the scans page) and open it in the web browser."""
    import webbrowser

    if not api_key:
        err.print("error: no API key: pass --api-key or set ANTIDOTE_API_KEY")
        raise typer.Exit(client.ERROR)
    try:
        link = client.page_link(url, api_key, scan_id)
    except (client.ClientError, httpx.HTTPError) as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(client.ERROR) from exc
    typer.echo(link)
    if browser:
        webbrowser.open(link)


@app.command()
def demo(data_dir: Annotated[Path, typer.Option(help="state of the demo server")] = Path("./demo-data"),
         port: int = 8765) -> None:
    """End to end on the embedded default: train a small backdoored model, serve, scan (and repair) it."""
    from cli.demo import run_demo

    raise typer.Exit(run_demo(data_dir, port))


if __name__ == "__main__":
    app()
