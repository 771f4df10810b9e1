"""The project's own documentation (docs/) stays in step with the code: links resolve, and every setting,
spec field, repair parameter, attack parameter and architecture the code accepts is named in it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from core.attacks.registry import ATTACKS
from core.defenses.registry import COMMON_PARAMS, REPAIR_METHODS
from core.models.registry import ARCHITECTURES
from core.spec import AttackSpec, DetectSpec, ModelSpec, RepairDataSpec, RepairSpec, ScanSpec
from store.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _text(name: str) -> str:
    return (DOCS / name).read_text()


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than ``-`` and ``_`` dropped, spaces to ``-``."""
    out = set()
    for line in path.read_text().splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_the_docs_folder_has_its_pages() -> None:
    names = {p.name for p in PAGES}
    assert {"README.md", "api.md", "cli.md", "formats.md", "methods.md", "data.md"} <= names


@pytest.mark.parametrize("page", [*PAGES, ROOT / "README.md"], ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    broken = []
    for target in _LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading)")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_no_tracked_file_points_outside_the_repository_for_docs() -> None:
    """Users who clone the repository have no ../shared folder."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in files:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".toml", ".yml", ".yaml", ".cfg", "") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        hits += [name for marker in ("../shared/", "/work/shared") if marker in text and path != Path(__file__)]
    assert not hits, f"references to the team's shared folder: {sorted(set(hits))}"


def test_every_setting_is_documented() -> None:
    documented = _text("cli.md")
    missing = [f"ANTIDOTE_{name.upper()}" for name in Settings.model_fields
               if f"ANTIDOTE_{name.upper()}" not in documented]
    assert not missing, f"settings missing from docs/cli.md's configuration table: {missing}"


def test_every_spec_field_is_documented() -> None:
    api = _text("api.md")
    prefixes = {ScanSpec: "", ModelSpec: "model.", AttackSpec: "attack.", RepairSpec: "repair.", DetectSpec: "detect.",
                RepairDataSpec: "repair_data."}
    missing = [f"{prefix}{name}" for cls, prefix in prefixes.items() for name in cls.model_fields
               if f"`{prefix}{name}`" not in api]
    assert not missing, f"spec fields missing from docs/api.md: {missing}"


def test_every_repair_method_and_parameter_is_documented() -> None:
    api, methods = _text("api.md"), _text("methods.md")
    missing = [m for m in REPAIR_METHODS if f"`{m}`" not in api or f"`{m}`" not in methods]
    params = {p for method in REPAIR_METHODS.values() for p in method.param_types} | set(COMMON_PARAMS)
    missing += [p for p in sorted(params) if f"`{p}`" not in api]
    assert not missing, f"repair methods or parameters missing from docs/api.md or docs/methods.md: {missing}"


def test_every_data_repair_method_and_parameter_is_in_the_parameter_reference() -> None:
    from core.datarepair.registry import DATA_REPAIR_METHODS

    reference = _text("parameters.md").split("## `spec.repair_data.params`", 1)[-1].split("\n## ", 1)[0]
    missing = [f"{m}.{p}" for m, entry in DATA_REPAIR_METHODS.items() for p in [*entry.param_types, ""]
               if f"`{p or m}`" not in reference]
    assert not missing, f"data-repair methods or parameters missing from docs/parameters.md: {missing}"


def test_every_attack_and_parameter_is_documented() -> None:
    api = _text("api.md")
    missing = []
    for name, builder in ATTACKS.items():
        if f"`{name}`" not in api:
            missing.append(name)
        fields = {f.name for f in dataclasses.fields(builder) if f.init} - {"image_shape", "target", "seed"}
        missing += [f"{name}.{f}" for f in sorted(fields) if f"`{f}`" not in api]
    assert not missing, f"attacks or attack parameters missing from docs/api.md: {missing}"


def test_every_architecture_is_documented() -> None:
    formats = _text("formats.md")
    missing = [a for a in (*ARCHITECTURES, "torchvision.<name>") if f"`{a}`" not in formats]
    assert not missing, f"architectures missing from docs/formats.md: {missing}"
