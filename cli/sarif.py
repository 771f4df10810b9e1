"""SARIF 2.1.0 from a scan's outcome, for code-scanning UIs (GitHub, GitLab): one result per backdoor verdict,
gate failure and file finding, located at the model file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "sarif-schema-2.1.0.json"
_LEVELS = {"high": "error", "medium": "warning", "low": "note", "info": "note"}
_HELP = {
    "ANTIDOTE-VERDICT": "The scan's verdict on whether the model carries a backdoor; a flagged model should be "
                        "repaired (antidote repair) or not shipped.",
    "ANTIDOTE-GATE": "A CI gate (--max-asr, --min-acc and the like) failed on the model the client would ship.",
    "AD001": "A global the checkpoint's pickle imports; listed so that reviewers see everything it names.",
    "AD101": "The pickle imports a callable that runs code or commands (os.system, builtins.exec, subprocess, "
             "timeit.timeit, runpy); the upload is refused and never loaded.",
    "AD102": "The pickle calls (REDUCE/NEWOBJ/INST/OBJ) or BUILDs a global outside the state-dict allowlist; a "
             "permissive loader would run it. Save only model.state_dict(), or use .safetensors.",
    "AD103": "The pickle calls what another call returned (a nested __reduce__), so the code it runs is chosen "
             "at load time.",
    "AD104": "The pickle calls something that is not a named global.",
    "AD201": "A BackdoorBench result names a global outside the allowlist; the loader replaces it with an inert "
             "placeholder, so it is not run.",
    "AD000": "The checkpoint's format holds no code.",
    "AD900": "The pickle could not be decoded, so it cannot be inspected; it is refused.",
}


def build_sarif(model_path: Path, report: dict[str, Any] | None, gate_failures: list[str],
                file_findings: list[dict[str, Any]] | None = None, tool_version: str = "0.1.0") -> dict[str, Any]:
    """The SARIF log of one client run; ``file_findings`` overrides the report's (a refused upload has only
    the 422 body's)."""
    artifact = model_path.as_posix()
    results: list[dict[str, Any]] = []
    verdict = (report or {}).get("verdict")
    if verdict is not None:
        flagged, text = _verdict(verdict)
        results.append(_result("ANTIDOTE-VERDICT", "error" if flagged else "note", text, artifact))
    for failure in gate_failures:
        results.append(_result("ANTIDOTE-GATE", "error", f"gate failed: {failure}", artifact))
    findings = file_findings if file_findings is not None else (report or {}).get("file_findings", [])
    for f in findings:
        loc = f.get("location") or {}
        where = f" (pickle member {loc.get('member')}, byte {loc.get('offset')})" if loc.get("member") else ""
        results.append(_result(str(f["rule_id"]), _LEVELS.get(str(f.get("severity")), "note"),
                               f"{f['message']}{where}", artifact))
    rule_ids = sorted({r["ruleId"] for r in results})
    rules = [{"id": rid, "shortDescription": {"text": _HELP.get(rid, rid).split(";")[0][:200]},
              "help": {"text": _HELP.get(rid, "See docs/api.md, report field file_findings.")}} for rid in rule_ids]
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "antidote", "version": tool_version,
                                "informationUri": "https://github.com/antidote/antidote", "rules": rules}},
            "artifacts": [{"location": {"uri": artifact}}],
            "results": results,
        }],
    }


def write_sarif(path: Path, log: dict[str, Any]) -> None:
    """Write ``log`` as indented JSON (code-scanning uploaders read the whole file)."""
    path.write_text(json.dumps(log, indent=2))


def _result(rule_id: str, level: str, text: str, artifact: str) -> dict[str, Any]:
    return {"ruleId": rule_id, "level": level, "message": {"text": text},
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": artifact, "index": 0}}}]}


def _verdict(verdict: object) -> tuple[bool, str]:
    """Whether a report's ``verdict`` flags a backdoor, and a sentence for it (a label or an object with one)."""
    if isinstance(verdict, dict):
        label = verdict.get("label") or verdict.get("verdict") or verdict.get("status")
        flagged = bool(verdict.get("backdoored", label in ("backdoored", "suspicious", "flagged")))
        return flagged, f"backdoor verdict: {label or ('backdoored' if flagged else 'clean')}: " \
                        f"{json.dumps(verdict, sort_keys=True)[:500]}"
    label = str(verdict)
    return label.lower() in ("backdoored", "suspicious", "flagged"), f"backdoor verdict: {label}"
