"""Quantized tables (DeepSeek-V4.1 layout): build, store, look up, dequantize bit-exactly.

Every dequantized value is compared with an independent oracle written here in plain
numpy: the fp8/fp4/UE8M0 codes are decoded by their bit formulas (not by a torch dtype),
multiplied exactly in float64, and rounded to bfloat16 with round-to-nearest-even on the
bits. The inputs cover every fp8 code under every scale code, so the overflow (inf),
bf16-subnormal, NaN and signed-zero edges are all exercised (asserted below, so the test
cannot silently stop covering them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tierstore
from tierstore import CheckpointError, CorruptDataError, FormatVersionError, TierStoreError
from tierstore.format.quant import FP4_SCHEME, FP8_SCHEME, Quant, _dequantize_torch, dequantize, split_rows
from tierstore.format.spec import manifest_digest, read_manifest

from ...v41 import assert_dequantized, embed, oracle, scale_of, write_v41_checkpoint

V41_LAYERS = {1: 3001, 3: 2999}  # layer -> rows (the real ones hold ~384M)


def v41_checkpoint(root: Path, **kw) -> dict[str, np.ndarray]:
    return write_v41_checkpoint(root, V41_LAYERS, **kw)

# --- inputs that cover every code --------------------------------------------------------------


def every_code_rows(quant: Quant, extra: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Value and scale bytes in which every value byte meets every scale byte (rows where all
    scales are one code, values a permutation of every byte), plus ``extra`` random rows."""
    rng = np.random.default_rng(seed)
    per_row = quant.value_bytes
    reps = -(-256 // per_row)  # rows needed to show all 256 value bytes
    rows = 256 * reps + extra
    values = np.empty((rows, per_row), dtype=np.uint8)
    scales = rng.integers(0, 256, (rows, quant.n_scales), dtype=np.uint8)
    for code in range(256):  # a loop over scale codes building test data, not a hot path
        block = rng.permutation(np.tile(np.arange(256, dtype=np.uint8), reps * per_row // 256 + 1))
        values[code * reps : (code + 1) * reps] = block[: reps * per_row].reshape(reps, per_row)
        scales[code * reps : (code + 1) * reps] = code
    values[256 * reps :] = rng.integers(0, 256, (extra, per_row), dtype=np.uint8)
    return values, scales


@pytest.mark.parametrize("scheme", [FP8_SCHEME, FP4_SCHEME])
def test_dequantize_every_code_matches_oracle(scheme):
    quant = Quant(scheme, 32, 256)
    values, scales = every_code_rows(quant, extra=500, seed=1)
    rows = torch.from_numpy(np.concatenate([values, scales], axis=1))
    got = dequantize(rows, quant)  # on CPU: the compiled table gather
    assert got.shape == (len(values), 256)
    assert_dequantized(got, values, scales, quant)
    elementwise = torch.empty_like(got)  # the torch path that CUDA runs (and that builds the tables)
    _dequantize_torch(rows, quant, elementwise)
    assert_dequantized(elementwise, values, scales, quant)
    # the edges are really exercised: infinities, bf16 subnormals, NaN and -0.0
    want, nan = oracle(values, scales, quant)
    exp, man = (want >> 7) & 0xFF, want & 0x7F
    assert ((exp == 0xFF) & (man == 0) & ~nan).any(), "no product overflowed to inf"
    assert ((exp == 0) & (man != 0)).any(), "no bf16 subnormal result"
    assert nan.any() and (want == 0x8000).any()
    # out= and leading dimensions
    out = torch.empty(2, len(values) // 2, 256, dtype=torch.bfloat16)
    n2 = len(values) // 2 * 2
    dequantize(rows[:n2].view(2, -1, quant.row_bytes), quant, out=out)
    assert_dequantized(out, values[:n2], scales[:n2], quant)


def test_split_rows_views_the_stored_bytes():
    quant = Quant(FP8_SCHEME, 32, 256)
    rows = torch.randint(0, 256, (5, 3, 264), dtype=torch.uint8)
    v, s = split_rows(rows, quant)
    assert v.dtype == torch.float8_e4m3fn and v.shape == (5, 3, 256)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (5, 3, 8)
    assert torch.equal(v.view(torch.uint8), rows[..., :256]) and torch.equal(s.view(torch.uint8), rows[..., 256:])
    v4, s4 = split_rows(rows[..., :136].contiguous(), Quant(FP4_SCHEME, 32, 256))
    assert v4.dtype == torch.uint8 and v4.shape == (5, 3, 128) and s4.shape == (5, 3, 8)
    with pytest.raises(TierStoreError, match=r"uint8 \(\.\.\., 264\)"):
        dequantize(rows[..., :200], quant)


@pytest.mark.parametrize("kw", [dict(scheme="int4"), dict(values=250), dict(block=0), dict(values=31, block=31,
                                                                                       scheme=FP4_SCHEME)])
def test_quant_refuses_bad_parameters(kw):
    args = {"scheme": FP8_SCHEME, "block": 32, "values": 256, **kw}
    with pytest.raises(TierStoreError):
        Quant(**args)


def check_lookups(store_path: Path, raw: dict[str, np.ndarray], quant: Quant, *, device: str = "cpu",
                  budgets: tuple[int, int] = (0, 0)) -> dict:
    rng = np.random.default_rng(7)
    with tierstore.open(store_path, device=device, device_budget=budgets[0], host_budget=budgets[1]) as store:
        for name in (embed(L) for L in V41_LAYERS):
            w, s = raw[name], raw[scale_of(name)]
            info = store.tables[name]
            assert info.quant == quant and (info.lookup_dim, info.lookup_dtype) == (256, torch.bfloat16)
            for n in (900, 5000):  # inline prefetch (<= 1024 ids) and the worker path
                ids = torch.from_numpy(rng.integers(0, len(w), (2, n // 2)))
                got = store.lookup(name, ids)
                assert got.shape == (2, n // 2, 256) and got.device.type == device
                assert_dequantized(got, w[ids.numpy()], s[ids.numpy()], quant)
                fut = store.prefetch(name, ids).result()
                assert torch.equal(fut.view(torch.int16), got.view(torch.int16))
                rows = store.lookup(name, ids, raw=True)
                assert rows.shape == (2, n // 2, quant.row_bytes) and rows.dtype == torch.uint8
                v, sc = split_rows(rows.cpu(), quant)
                assert np.array_equal(v.contiguous().view(torch.uint8).numpy(), w[ids.numpy()])
                assert np.array_equal(sc.contiguous().view(torch.uint8).numpy(), s[ids.numpy()])
                out = torch.empty(2, n // 2, 256, dtype=torch.bfloat16, device=device)
                assert store.lookup(name, ids, out=out).data_ptr() == out.data_ptr()
                assert torch.equal(out.view(torch.int16), got.view(torch.int16))
        many = store.prefetch_many({embed(1): [0, 5], embed(3): [7]}).result()
        assert many[embed(1)].shape == (2, 256) and many[embed(3)].dtype == torch.bfloat16
        with pytest.raises(TierStoreError, match="out= must be a contiguous torch.bfloat16"):
            store.lookup(embed(1), [1, 2], out=torch.empty(2, 264, dtype=torch.uint8, device=device))
        return store.stats()


@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
def test_v41_checkpoint_builds_and_serves_exact_rows(tmp_path, fp4):
    raw = v41_checkpoint(tmp_path / "ckpt", fp4=fp4)
    out = tierstore.build_store(tmp_path / "ckpt", tmp_path / "store", progress=False,
                                attach=[tmp_path / "ckpt" / "config.json"])
    quant = Quant(FP4_SCHEME if fp4 else FP8_SCHEME, 32, 256)
    manifest = read_manifest(out)
    assert sorted(manifest.tables) == [embed(L) for L in V41_LAYERS], "only the Engram embed tables are tables"
    for L, rows in V41_LAYERS.items():
        info = manifest.tables[embed(L)]
        assert (info.rows, info.dim, info.dtype, info.quant) == (rows, quant.row_bytes, "uint8", quant)
        assert info.source["scale"] == f"layers.{L}.engram.embed.scale"
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["tables"][0]["quant"] == {"scheme": quant.scheme, "block": 32, "values": 256}
    assert tierstore.verify_store(out, progress=False).ok
    # the tiers hold the stored rows: 264 (or 136) bytes per row, not 512 of bf16
    total = sum(V41_LAYERS.values()) * quant.row_bytes
    stats = check_lookups(out, raw, quant, budgets=(total // 8, total // 3))
    assert stats["disk"]["rows_read"] > 0 and stats["device"]["hits"] > 0 and stats["host"]["hits"] > 0
    check_lookups(out, raw, quant, budgets=(total, total))  # resident: the fast paths


def test_v41_shard_and_hotness_order_keep_scales_with_rows(tmp_path):
    raw = v41_checkpoint(tmp_path / "ckpt")
    quant = Quant(FP8_SCHEME, 32, 256)
    first = tierstore.build_store(tmp_path / "ckpt", tmp_path / "first", progress=False)
    from tierstore.format.profile import save_profile

    for L, rows in V41_LAYERS.items():
        save_profile(first, embed(L), np.random.default_rng(L).integers(0, 100, rows))
    ordered = tierstore.build_store(tmp_path / "ckpt", tmp_path / "ordered", order_by=first, progress=False)
    assert read_manifest(ordered).tables[embed(1)].order_file is not None
    check_lookups(ordered, raw, quant, budgets=(20000, 60000))
    shard = tierstore.build_store(tmp_path / "ckpt", tmp_path / "shard", shard=(1, 3), progress=False)
    with tierstore.open(shard, device="cpu") as store:
        name = embed(3)
        local = np.arange(store.tables[name].rows)
        got = store.lookup(name, local)
        glob = 1 + 3 * local
        assert_dequantized(got, raw[name][glob], raw[scale_of(name)][glob], quant)


# --- refusals ---------------------------------------------------------------------------------


def test_missing_scale_is_refused_naming_the_tensor(tmp_path):
    v41_checkpoint(tmp_path / "c", drop="layers.3.engram.embed.scale")
    with pytest.raises(CheckpointError, match=r"'layers\.3\.engram\.embed\.weight'.*no block scales "
                                              r"'layers\.3\.engram\.embed\.scale'.*download every shard"):
        tierstore.build_store(tmp_path / "c", tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_scale_without_rows_is_refused(tmp_path):
    v41_checkpoint(tmp_path / "c", drop="layers.3.engram.embed.weight")
    with pytest.raises(CheckpointError, match=r"'layers\.3\.engram\.embed\.scale' holds block scales but its rows"):
        tierstore.build_store(tmp_path / "c", tmp_path / "s", progress=False)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2999, 7, dtype=torch.uint8).view(torch.float8_e8m0fnu), "shapes disagree"),  # 7 does not divide 256
    (torch.zeros(3000, 8, dtype=torch.uint8).view(torch.float8_e8m0fnu), "shapes disagree"),  # row counts differ
    (torch.zeros(2999, 8, dtype=torch.float32), "expected F8_E8M0"),
])
def test_scale_shape_or_dtype_mismatch_is_refused(tmp_path, bad, match):
    v41_checkpoint(tmp_path / "c", override={"layers.3.engram.embed.scale": bad})
    with pytest.raises(CheckpointError, match=match):
        tierstore.build_store(tmp_path / "c", tmp_path / "s", progress=False)


def test_values_in_another_dtype_with_scales_are_refused(tmp_path):
    v41_checkpoint(tmp_path / "c", override={embed(3): torch.zeros(2999, 256, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError, match="F8_E4M3 values or packed FP4"):
        tierstore.build_store(tmp_path / "c", tmp_path / "s", progress=False)


def test_dtype_conversion_of_a_quantized_table_is_refused(tmp_path):
    v41_checkpoint(tmp_path / "c")
    with pytest.raises(TierStoreError, match="cannot convert quantized table"):
        tierstore.build_store(tmp_path / "c", tmp_path / "s", dtype="bfloat16", progress=False)
    with pytest.raises(TierStoreError, match="dtype='uint8' is not supported"):
        tierstore.build_store(tmp_path / "c", tmp_path / "s", dtype="uint8", progress=False)


def test_a_regex_matching_the_scales_keeps_them_with_their_rows(tmp_path):
    v41_checkpoint(tmp_path / "c")
    out = tierstore.build_store(tmp_path / "c", tmp_path / "s", tables=r"engram\.embed", progress=False)
    assert sorted(read_manifest(out).tables) == [embed(L) for L in V41_LAYERS]


# --- the manifest field ---------------------------------------------------------------------


def _rewrite_manifest(store: Path, edit) -> None:
    path = store / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc["tables"][0])
    doc["digest"] = manifest_digest(doc)
    path.write_text(json.dumps(doc))


def test_plain_stores_write_no_quant_field(tmp_path):
    from ...conftest import one_table_store

    path, _ = one_table_store(tmp_path, "blocks.1.engram.memory.weight", 100, 8)
    doc = json.loads((path / "manifest.json").read_text())
    assert "quant" not in doc["tables"][0], "old readers refuse unknown table keys: plain stores must not grow one"
    assert read_manifest(path).tables["blocks.1.engram.memory.weight"].quant is None


@pytest.mark.parametrize("edit, error, match", [
    (lambda t: t["quant"].update(block=16), CorruptDataError, "must store uint8 rows of 272 bytes"),
    (lambda t: t["quant"].update(scheme="int3/x"), FormatVersionError, "upgrade tierstore"),
    (lambda t: t.update(quant={"scheme": FP8_SCHEME}), CorruptDataError, "expected"),
    (lambda t: t["quant"].update(values=128, block=16), CorruptDataError, "must store uint8 rows of 136"),
    (lambda t: t.pop("quant"), CorruptDataError, "the row file says quant="),
])
def test_manifest_quant_is_checked_at_open(tmp_path, edit, error, match):
    v41_checkpoint(tmp_path / "c")
    out = tierstore.build_store(tmp_path / "c", tmp_path / "s", progress=False)
    _rewrite_manifest(out, edit)
    with pytest.raises(error, match=match):
        tierstore.open(out, device="cpu").close()


# --- CUDA -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [FP8_SCHEME, FP4_SCHEME])
def test_dequantize_on_cuda_matches_oracle(scheme):
    quant = Quant(scheme, 32, 256)
    values, scales = every_code_rows(quant, extra=100, seed=2)
    rows = torch.from_numpy(np.concatenate([values, scales], axis=1)).cuda()
    assert_dequantized(dequantize(rows, quant), values, scales, quant)


@pytest.mark.gpu
def test_v41_store_on_cuda_serves_exact_rows(tmp_path):
    raw = v41_checkpoint(tmp_path / "ckpt")
    out = tierstore.build_store(tmp_path / "ckpt", tmp_path / "store", progress=False)
    total = sum(V41_LAYERS.values()) * 264
    check_lookups(out, raw, Quant(FP8_SCHEME, 32, 256), device="cuda", budgets=(total // 8, total // 3))
