"""Every file path the docs and the README name exists: a doc that points at a moved or
deleted module misleads the reader who follows it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
SOURCES = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "build" not in p.parts]
# `tierstore/tiers/disk.py`, `tests/...::test_x`, `docs/format.md`: paths from the repository root
ROOTED = re.compile(r"`((?:tierstore|tests|benchmarks|tools|engram_model|docs)/[A-Za-z0-9_./-]+)(?:::[^`]*)?`")
# `disk.py`, `tiers/disk.py`: a module named by its file (possibly under a folder)
MODULE = re.compile(r"`([A-Za-z0-9_./-]+\.py)(?:::[^`]*)?`")
ALLOWED = {"tierstore/__pycache__"}  # named as where compiled code must NOT go


def _named() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        out += [(doc.name, m.group(1).rstrip(".,")) for m in ROOTED.finditer(text)]
        out += [(doc.name, m.group(1)) for m in MODULE.finditer(text)]
    return out


def test_every_path_named_in_the_docs_exists():
    rel = [str(p.relative_to(ROOT)) for p in SOURCES]
    missing = []
    for doc, path in _named():
        if path in ALLOWED or (ROOT / path).exists():
            continue
        if path.endswith(".py") and any(r == path or r.endswith("/" + path) for r in rel):
            continue
        missing.append(f"{doc}: {path}")
    assert not missing, "docs name files that do not exist:\n" + "\n".join(sorted(set(missing)))


def test_the_check_finds_a_missing_path(tmp_path):
    # negative control: the patterns catch both forms
    text = "see `tierstore/nowhere.py` and `gone.py`"
    assert [m.group(1) for m in ROOTED.finditer(text)] == ["tierstore/nowhere.py"]
    assert [m.group(1) for m in MODULE.finditer(text)] == ["tierstore/nowhere.py", "gone.py"]
