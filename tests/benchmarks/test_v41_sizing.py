"""The V4.1 sizing study's own arithmetic (benchmarks/v41_sizing.py, benchmarks/corpora.py):
checked against plain references so the figures of docs/v41_sizing.md can be trusted."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks.corpora import html_to_text, roff_to_text, split_and_name
from benchmarks.v41_sizing import capacity_for, checkpoints, growth

TOKENIZER = Path(os.environ.get("TIERSTORE_DEEPSEEK_TOKENIZER",
                                Path.home() / ".cache/tierstore/deepseek_v3-3.7.2/tokenizer.json"))


def test_checkpoints_are_1_2_5_steps():
    assert checkpoints(10_000) == [1000, 2000, 5000, 10_000]
    assert checkpoints(999) == []


def test_capacity_for_interpolates_on_a_log_scale():
    pts = [(0.001, 0.2), (0.01, 0.4), (0.1, 0.8)]
    assert capacity_for(pts, 0.4) == pytest.approx(0.01)
    assert capacity_for(pts, 0.6) == pytest.approx(10 ** -1.5)  # halfway in log capacity
    assert capacity_for(pts, 0.1) == 0.001  # met at the smallest measured: that capacity
    assert capacity_for(pts, 0.9) is None  # out of the measured range: no answer, not a guess


def test_converters_keep_the_text():
    assert roff_to_text('.\\" c\n.SH NAME\nls \\- liste \\fBfett\\fP \\e x\n') == "NAME\nls - liste fett \\ x"
    assert html_to_text("<html><head><title>t</title></head><body><p>Hallo &amp; <b>Welt</b></p>"
                        "<script>x=1</script></body></html>") == "Hallo & Welt"


def test_split_is_by_document_and_stable():
    a = [split_and_name(f"pkg/doc{i}") for i in range(2000)]
    assert a == [split_and_name(f"pkg/doc{i}") for i in range(2000)]
    test = sum(s == "test" for s, _ in a)
    assert 900 < test < 1100  # about half each way
    assert len({n for _, n in a}) == 2000  # one file per document


@pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"DeepSeek's tokenizer.json not at {TOKENIZER} "
                    "(docs/v41_sizing.md says how to fetch it)")
def test_growth_counts_distinct_rows_like_a_set(tmp_path: Path):
    from engram_model.trace import TraceSource

    texts = ["def f(x):\n    return x + 1\n" * 40, "Die Katze sitzt auf der Matte. " * 60, "import os\n" * 300]
    texts.append(texts[0])  # a document seen again: its rows are not new (a per-chunk count would say so)
    for i, t in enumerate(texts):
        (tmp_path / "c" / "train").mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / "train" / f"{i}.txt").write_text(t)
    g = growth("c", cache=tmp_path, tokenizer=str(TOKENIZER), limit=5000, zipf_tokens=2000)
    src = TraceSource(tokenizer=str(TOKENIZER), preset="deepseek-v4.1")
    docs = src.encode([(tmp_path / "c" / "train" / f"{i}.txt").read_text() for i in range(len(texts))])
    rows = [src.rows(d) for d in docs]
    assert g["tokens"] == min(5000, sum(d.size for d in docs)) and g["checkpoints"] == [1000, 2000]
    for t in src.tables:
        allrows = np.concatenate([r[t] for r in rows])
        for k, m in enumerate(g["checkpoints"]):
            assert g["distinct"][t][k] == np.unique(allrows[:m]).size, (t, m)
        z = g["zipf"][t]["2-gram"]
        assert z["lookups"] == allrows[:2000, :8].size and z["distinct"] == np.unique(allrows[:2000, :8]).size


def _fake_package(cache: Path, name: str, pages: dict[str, str]) -> None:
    """A package as ``fetch`` finds it once downloaded and unpacked (no apt, no dpkg)."""
    (cache / "debs").mkdir(parents=True, exist_ok=True)
    (cache / "debs" / f"{name}_1.0_all.deb").write_bytes(b"")
    for rel, text in pages.items():
        f = cache / "unpacked" / f"{name}_1.0_all" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.txt"))}


def test_a_source_added_to_a_built_corpus_is_added_as_a_fresh_build_would(tmp_path: Path, monkeypatch):
    from benchmarks import corpora
    from benchmarks.corpora import Source, build

    for cache in (tmp_path / "a", tmp_path / "b"):
        _fake_package(cache, "docs-de", {f"usr/share/doc/de/{i}.txt": f"Seite {i} auf Deutsch" for i in range(40)})
        _fake_package(cache, "docs-es", {f"usr/share/doc/es/{i}.txt": f"página {i} en español" for i in range(40)})
    de, es = Source("docs-de", r"/de/.*\.txt$", "rst"), Source("docs-es", r"/es/.*\.txt$", "rst")
    monkeypatch.setitem(corpora.CORPORA, "x", [de])
    build("x", tmp_path / "a")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "a" / "x").rglob("*.txt")}
    monkeypatch.setitem(corpora.CORPORA, "x", [de, es])
    build("x", tmp_path / "a")  # adds docs-es, leaves docs-de's files alone
    build("x", tmp_path / "b")  # from scratch
    assert _tree(tmp_path / "a" / "x") == _tree(tmp_path / "b" / "x")
    assert len(_tree(tmp_path / "a" / "x")) == 80
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    manifest = (tmp_path / "a" / "x" / "MANIFEST").read_text()
    assert manifest == (tmp_path / "b" / "x" / "MANIFEST").read_text()
    assert manifest.count("40 documents") == 2
    build("x", tmp_path / "a")  # nothing missing: nothing written
    assert (tmp_path / "a" / "x" / "MANIFEST").read_text() == manifest


def test_hit_tables_bold_default_and_its_margin_over_the_best_online_policy():
    from benchmarks.v41_sizing import hit_tables

    def r(policy, cap, hit, table="layers.14.engram.embed.weight"):
        return {"policy": policy, "capacity_fraction": cap, "capacity_rows": int(cap * 1e6), "hit_ratio": hit,
                "lookups": 1000, "table": table}
    run = {"results": [r("lru", 0.01, 0.5), r("arc", 0.01, 0.6), r("default", 0.01, 0.55), r("opt", 0.01, 0.9),
                       r("lru", 0.1, 0.7), r("arc", 0.1, 0.65), r("default", 0.1, 0.8), r("opt", 0.1, 1.0),
                       r("lru", 0.01, 0.1, "layers.1.engram.embed.weight"),
                       r("default", 0.01, 0.2, "layers.1.engram.embed.weight")],
           "seconds": 3.0, "seconds_by_table": {"layers.14.engram.embed.weight": 7.0}}
    md = hit_tables({"x_b1": run})
    assert md.index("x_b1, layers.1**") < md.index("x_b1, layers.14**")  # by layer number, not as strings
    assert "layers.14** (1,000 lookups; 7 s of wall time)" in md and "layers.1** (1,000 lookups; 3 s" in md
    assert "| 1% (10,000) | 0.5000 | 0.6000 | **0.5500** | 0.9000 | -0.0500 (arc) |" in md  # opt is no rival
    assert "| 10% (100,000) | 0.7000 | 0.6500 | **0.8000** | 1.0000 | +0.1000 (lru) |" in md


def test_budget_table_bounds_interpolates_and_says_not_reached():
    from benchmarks.v41_sizing import budget, budget_table

    n = 2**20  # rows: 1% of the table is 2.64 MiB of 264-byte rows
    def r(policy, cap, hit, table="layers.1.engram.embed.weight"):
        return {"policy": policy, "capacity_fraction": cap, "capacity_rows": int(cap * n), "hit_ratio": hit,
                "lookups": 1000, "table": table}
    res = [r("default", 0.01, 0.6), r("default", 0.1, 0.85), r("lru", 0.01, 0.3), r("lru", 0.1, 0.5),
           r("default", 0.01, 0.0, "layers.14.engram.embed.weight"),
           r("default", 0.1, 0.0, "layers.14.engram.embed.weight")]
    hits = {"x_b1": {"results": res, "seconds": 1.0}}
    md = budget_table(budget(hits, None), hits)
    lines = md.splitlines()
    assert lines[0] == "| run | policy | 50% hits | 80% hits | 90% hits | 95% hits |"
    # layer 1 only (the lowest layer), policies in the doc's order, no row for a policy not measured
    assert [ln.split(" | ")[1] for ln in lines[2:]] == ["default", "lru"]
    f80 = 10 ** (-2 + 0.8)  # 0.8 lies 80% of the way from 0.6 to 0.85: log-interpolated capacity
    assert lines[2] == (f"| x_b1 | default | <= 2.6 MiB (<= 1%) | {f80 * n * 264 / 2**20:.1f} MiB "
                        f"({100 * f80:.2g}%) | not reached at 10% | not reached at 10% |")
    assert lines[3].startswith("| x_b1 | lru | 26.4 MiB (10%) | not reached at 10% |")
    assert "layers.14" not in md and budget_table([], {}) == ""
