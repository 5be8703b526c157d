"""Seeded mutation fuzzing of the files tierstore reads: the manifest, traces, profiles.

For every mutant the reader either raises a ``TierStoreError`` subclass or gives an exact
result; never a raw AttributeError/KeyError/TypeError/ValueError/OverflowError, never
wrong rows:

* manifest.json: ``tierstore.open`` then a lookup of every row of every table returns the
  reference rows (same names, shapes, dtypes, bytes), and ``verify_store`` never says ok
  for a store whose lookups are wrong;
* traces (``save_trace`` files and plain .npy): a damaged compressed trace loads exactly
  or raises; a structurally edited one (valid JSON, other numbers) may load, but only as a
  self-consistent trace (integer ids, ascending offsets, ``n_rows`` an int above every id);
  a .npy (no checksum) loads as a valid trace or raises;
* profiles: ``load_profile`` returns exactly the saved counts or raises, and a store with
  that profile opens and looks up exact rows or raises.

About 200 mutants per kind; each kind takes a few seconds.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tierstore
from tierstore import TierStoreError
from tierstore.format.spec import DTYPES
from tierstore.format.profile import load_profile, profile_paths, save_profile
from tierstore.analysis.simulate import TableTrace, Trace, load_trace, save_trace

N_MUTANTS = 200
T_A = "fuzz.a.weight"  # 300 rows x 16 float32 (64 B rows)
T_B = "fuzz.b.weight"  # 120 rows x 10 bfloat16 (20 B rows: not a multiple of 8)


# ---------------------------------------------------------------------------------------
# generic JSON mutation
# ---------------------------------------------------------------------------------------
def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys/indices) to a value inside a JSON document."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _new_value(rng: np.random.Generator, old: Any) -> tuple[str, Any]:
    """A replacement for ``old``: a nearby number, another dtype name, a wrong JSON type."""
    choices: list[tuple[str, Any]] = [
        ("null", None), ("list", [old]), ("object", {"v": old}), ("string", str(old)),
        ("bool", True), ("empty string", ""), ("float", 1.5),
    ]
    if isinstance(old, int) and not isinstance(old, bool):
        choices += [(f"{old}+1", old + 1), (f"{old}-1", old - 1), ("+1 again", old + 1), ("-1 again", old - 1),
                    ("negative", -old - 1), ("zero", 0), ("huge", 2**70), ("float of it", float(old)),
                    ("double", old * 2), ("half", old // 2)]
    if isinstance(old, str):
        choices += [(f"dtype {d}", d) for d in DTYPES] + [("dtype int8", "int8"), ("other path", old + "x"),
                                                          ("path escape", "../" + old), ("absolute", "/" + old)]
    if isinstance(old, float):
        choices += [("nan", float("nan")), ("inf", float("inf"))]
    name, value = choices[int(rng.integers(len(choices)))]
    return name, value


def mutate_json(rng: np.random.Generator, doc: Any, *, text: str) -> tuple[str, str]:
    """(description, new text): one to three structural edits, or a bit flip of the text."""
    r = rng.random()
    if r < 0.2:  # flip one bit of the text
        raw = bytearray(text.encode())
        i = int(rng.integers(len(raw)))
        raw[i] ^= 1 << int(rng.integers(8))
        return f"bit flip at byte {i}", raw.decode("utf-8", errors="surrogateescape")
    if r < 0.25:
        cut = int(rng.integers(len(text)))
        return f"truncated at {cut}", text[:cut]
    if r < 0.3:  # whole-document type confusion
        kind = int(rng.integers(3))
        return ("document is a list", json.dumps([doc])) if kind == 0 else \
            ("document is null", "null") if kind == 1 else ("document is a number", "17")
    doc = copy.deepcopy(doc)
    what = []
    for _ in range(1 + int(rng.random() < 0.3) + int(rng.random() < 0.1)):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = paths[int(rng.integers(len(paths)))]
        if rng.random() < 0.2:
            parent = _get(doc, path[:-1])
            del parent[path[-1]]
            what.append(f"delete {'/'.join(map(str, path))}")
        else:
            name, value = _new_value(rng, _get(doc, path))
            doc = _set(doc, path, value)
            what.append(f"{'/'.join(map(str, path))} -> {name}")
    return "; ".join(what), json.dumps(doc, indent=2)


def run_mutants(kind: str, n: int, seed: int, one: Callable[[np.random.Generator, int], str | None]) -> None:
    """Run ``n`` mutants; ``one`` returns None when the outcome is acceptable, else why not.
    Untyped exceptions escaping ``one`` are findings too."""
    findings: list[str] = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        try:
            why = one(rng, i)
        except TierStoreError:
            why = None
        except Exception as e:  # noqa: BLE001 - the finding
            why = f"untyped {type(e).__name__}: {str(e)[:160]}"
        if why:
            findings.append(f"mutant {i}: {why}")
    assert not findings, (f"{kind}: {len(findings)} of {n} mutants neither raised a TierStoreError nor gave "
                          f"an exact result; first ones:\n  " + "\n  ".join(findings[:12]))


# ---------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("fuzz")
    g = torch.Generator().manual_seed(99)
    tensors = {T_A: torch.randn(300, 16, generator=g), T_B: torch.randn(120, 10, generator=g).to(torch.bfloat16)}
    save_file(tensors, str(d / "model.safetensors"))
    path = tierstore.build_store(d / "model.safetensors", d / "store", tables=r"^fuzz\.", progress=False)
    return path, tensors


def _store_outcome(path: Path, refs: dict[str, torch.Tensor], **open_kw: Any) -> str | None:
    """None if every reference row reads back exactly (or a TierStoreError is raised); else
    what was wrong. Raises whatever the store raises."""
    with tierstore.open(path, device="cpu", **open_kw) as store:
        for name, ref in refs.items():
            info = store.tables.get(name)
            rows = max(ref.shape[0], info.rows if info is not None else 0)
            got = store.lookup(name, np.arange(rows))  # UnknownTableError/InvalidIdError: fine
            if got.shape != ref.shape or got.dtype != ref.dtype:
                return f"{name} reads as {got.dtype} {tuple(got.shape)}, the table is {ref.dtype} {tuple(ref.shape)}"
            wrong = int((got.view(torch.uint8) != ref.view(torch.uint8)).any(dim=1).sum())
            if wrong:
                return f"{name}: {wrong} wrong rows"
    return None


def test_fuzz_manifest(fuzz_store, tmp_path):
    src, refs = fuzz_store
    path = tmp_path / "store"
    shutil.copytree(src, path)
    manifest = path / "manifest.json"
    text = manifest.read_text()
    doc = json.loads(text)

    def one(rng: np.random.Generator, i: int) -> str | None:
        what, mutated = mutate_json(rng, doc, text=text)
        manifest.write_bytes(mutated.encode("utf-8", errors="surrogateescape"))
        try:
            budget = [dict(), dict(device_budget="8KiB", host_budget="32KiB"), dict(host_budget="1MiB")][i % 3]
            try:
                wrong = _store_outcome(path, refs, **budget)
            except TierStoreError:
                wrong = None
            except Exception as e:  # noqa: BLE001
                return f"{what}: open/lookup raised untyped {type(e).__name__}: {str(e)[:160]}"
            try:
                ok = tierstore.verify_store(path, progress=False).ok
            except TierStoreError:
                ok = False
            except Exception as e:  # noqa: BLE001
                return f"{what}: verify_store raised untyped {type(e).__name__}: {str(e)[:160]}"
            if wrong:
                return f"{what}: lookups wrong ({wrong}); verify_store says {'ok' if ok else 'not ok'}"
            return None
        finally:
            manifest.write_text(text)

    run_mutants("manifest.json", N_MUTANTS, 1, one)
    assert _store_outcome(path, refs) is None  # the pristine store still reads back


@pytest.mark.parametrize("field,delta", [("dim", 1), ("dim", -1), ("rows", 1), ("row_stride", 16)])
def test_manifest_numbers_are_checked(fuzz_store, tmp_path, field, delta):
    """The example that must never pass: "dim": 16 -> 17 (rows no longer line up)."""
    src, refs = fuzz_store
    path = tmp_path / "store"
    shutil.copytree(src, path)
    doc = json.loads((path / "manifest.json").read_text())
    entry = next(t for t in doc["tables"] if t["name"] == T_A)
    entry[field] += delta
    if field == "row_stride":  # keep file_bytes consistent so only the row geometry is wrong
        entry["file_bytes"] = tierstore.TableInfo.expected_file_bytes(entry["rows"], entry["row_stride"])
    (path / "manifest.json").write_text(json.dumps(doc))
    try:
        wrong = _store_outcome(path, {T_A: refs[T_A]})
    except TierStoreError:
        return
    assert wrong is None, f"manifest {field} {'+' if delta > 0 else ''}{delta} opened without error: {wrong}"


# ---------------------------------------------------------------------------------------
# traces
# ---------------------------------------------------------------------------------------
def _trace_ok(t: Trace) -> str | None:
    """Why a loaded trace is not self-consistent, or None."""
    if not isinstance(t.tables, dict) or not t.tables:
        return "no tables"
    for name, tt in t.tables.items():
        if not isinstance(name, str):
            return f"table name {name!r} is not a string"
        r = tt.rows
        if not isinstance(r, np.ndarray) or r.dtype != np.int64 or r.ndim != 1:
            return f"{name}: rows are {type(r).__name__} {getattr(r, 'dtype', '')} {getattr(r, 'shape', '')}"
        if r.size and r.min() < 0:
            return f"{name}: negative row ids"
        if tt.n_rows is not None:
            if not isinstance(tt.n_rows, (int, np.integer)) or isinstance(tt.n_rows, bool):
                return f"{name}: n_rows is {tt.n_rows!r}"
            if r.size and int(r.max()) >= int(tt.n_rows):
                return f"{name}: holds row {int(r.max())} but n_rows is {tt.n_rows}"
        o = tt.offsets
        if o is not None:
            if not isinstance(o, np.ndarray) or o.dtype != np.int64 or o.ndim != 1:
                return f"{name}: offsets are {type(o).__name__}"
            if o.size and (o[0] != 0 or np.any(np.diff(o) <= 0) or o[-1] >= max(1, r.size)):
                return f"{name}: offsets not ascending from 0 within the trace"
    return None


def _same_trace(a: Trace, b: Trace) -> bool:
    if list(a.tables) != list(b.tables):
        return False
    for n in a.tables:
        x, y = a.tables[n], b.tables[n]
        if not np.array_equal(x.rows, y.rows) or x.n_rows != y.n_rows:
            return False
        if (x.offsets is None) != (y.offsets is None):
            return False
        if x.offsets is not None and not np.array_equal(x.offsets, y.offsets):
            return False
    return True


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=1).compress(data)


def _unzstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 30)


def _flip(rng: np.random.Generator, raw: bytes, lo: int = 0) -> tuple[str, bytes]:
    b = bytearray(raw)
    r = rng.random()
    if r < 0.15:
        cut = int(rng.integers(lo, len(b)))
        return f"truncated at {cut}", bytes(b[:cut])
    i = int(rng.integers(lo, len(b)))
    if r < 0.25:
        b[i] = int(rng.integers(256))
        return f"byte {i} replaced", bytes(b)
    b[i] ^= 1 << int(rng.integers(8))
    return f"bit flip at byte {i}", bytes(b)


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trace]:
    rng = np.random.default_rng(3)
    trace = Trace({
        T_A: TableTrace(rng.integers(0, 300, size=400), np.arange(0, 400, 16), 300),
        T_B: TableTrace(rng.integers(0, 40, size=120), None, 40),
    }, {"source": "fuzz"})
    path = save_trace(tmp_path_factory.mktemp("trace") / "t.trace.zst", trace)
    return path, load_trace(path)


def _npz_members(raw: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(_unzstd(raw))) as z:
        return {n: z.read(n) for n in z.namelist()}


def _npz_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    return _zstd(buf.getvalue())


def _npy_header_end(data: bytes) -> int:
    major = data[6]
    hlen = int.from_bytes(data[8:10], "little") if major == 1 else int.from_bytes(data[8:12], "little")
    return (10 if major == 1 else 12) + hlen


def _npy_with_header(data: bytes, header: str) -> bytes:
    """``data`` (a version 1 .npy) with its header text replaced, length field and padding redone."""
    end = _npy_header_end(data)
    text = header[10:].rstrip(" \n")
    text += " " * ((64 - (10 + len(text) + 1) % 64) % 64) + "\n"
    return data[:8] + len(text).to_bytes(2, "little") + text.encode("latin1") + data[end:]


def _mutate_npy(rng: np.random.Generator, data: bytes) -> tuple[str, bytes]:
    """Edit a .npy: its header dict (dtype, shape, order) or its data bytes."""
    end = _npy_header_end(data)
    header = data[:end].decode("latin1")
    r = rng.random()
    if r < 0.6:
        edits = [("'<i4'", "'<f4'"), ("'<i4'", "'|b1'"), ("'<i8'", "'<f8'"), ("'<i4'", "'<u2'"),
                 ("'<i8'", "'<i2'"), ("'<i4'", "'>i4'"), ("'<i4'", "'<c8'"), ("'<i8'", "'O'"),
                 ("False", "True"), ("'shape': (", "'shape': (2, "), ("'shape': (", "'shape': (7"),
                 ("'shape': (", "'shape': ("), (",)", ", 1)"), ("'descr'", "'decr'")]
        a, b = edits[int(rng.integers(len(edits)))]
        if a not in header:
            return "no-op header edit", data
        return f"npy header {a} -> {b}", _npy_with_header(data, header.replace(a, b, 1))
    what, flipped = _flip(rng, data, lo=end if r < 0.9 else 0)
    return f"npy {what}", flipped


def test_fuzz_trace_file(trace_file, tmp_path):
    path, original = trace_file
    raw = path.read_bytes()
    members = _npz_members(raw)
    header = json.loads(members["header.npy"][_npy_header_end(members["header.npy"]):].decode())
    target = tmp_path / "m.trace.zst"

    def one(rng: np.random.Generator, i: int) -> str | None:
        r = rng.random()
        structural = False
        if r < 0.3:  # damage the compressed file: it must load exactly or raise
            what, blob = _flip(rng, raw)
        elif r < 0.7:  # valid container, edited header JSON
            htext = json.dumps(header)
            what, new = mutate_json(rng, header, text=htext)
            hb = new.encode("utf-8", errors="surrogateescape")
            buf = io.BytesIO()
            np.save(buf, np.frombuffer(hb, dtype=np.uint8))
            blob = _npz_bytes({**members, "header.npy": buf.getvalue()})
            structural = True
        else:  # valid container, one array edited, renamed or dropped
            m = dict(members)
            name = sorted(m)[int(rng.integers(len(m)))]
            k = rng.random()
            if k < 0.2:
                del m[name]
                what = f"member {name} dropped"
            elif k < 0.3:
                m[name.replace("0", "5").replace("1", "0")] = m.pop(name)
                what = f"member {name} renamed"
            else:
                what, m[name] = _mutate_npy(rng, m[name])
                what = f"{name}: {what}"
            blob = _npz_bytes(m)
            structural = True
        target.write_bytes(blob)
        t = load_trace(target)
        if _same_trace(t, original):
            return None
        if not structural:
            return f"{what}: a damaged trace file loaded as a different trace"
        why = _trace_ok(t)
        return f"{what}: loaded an inconsistent trace ({why})" if why else None

    run_mutants("trace file", N_MUTANTS, 2, one)


def test_fuzz_npy_trace(tmp_path):
    rows = np.random.default_rng(4).integers(0, 1000, size=256).astype(np.int64)
    buf = io.BytesIO()
    np.save(buf, rows)
    raw = buf.getvalue()
    target = tmp_path / "m.npy"

    def one(rng: np.random.Generator, i: int) -> str | None:
        what, blob = _mutate_npy(rng, raw)
        target.write_bytes(blob)
        t = load_trace(target)
        why = _trace_ok(t)
        return f"{what}: loaded an inconsistent trace ({why})" if why else None

    run_mutants(".npy trace", N_MUTANTS, 3, one)


# ---------------------------------------------------------------------------------------
# profiles
# ---------------------------------------------------------------------------------------
def test_fuzz_profile(fuzz_store, tmp_path):
    src, refs = fuzz_store
    path = tmp_path / "store"
    shutil.copytree(src, path)
    counts = np.random.default_rng(8).zipf(1.5, size=300).astype(np.int64)
    save_profile(path, T_A, counts, meta={"source": "fuzz"})
    data_path, meta_path = profile_paths(path, T_A)
    data_raw, meta_text = data_path.read_bytes(), meta_path.read_text()
    meta = json.loads(meta_text)
    npy = _unzstd(data_raw)

    def one(rng: np.random.Generator, i: int) -> str | None:
        r = rng.random()
        if r < 0.45:
            what, new = mutate_json(rng, meta, text=meta_text)
            meta_path.write_bytes(new.encode("utf-8", errors="surrogateescape"))
        elif r < 0.65:
            what, blob = _flip(rng, data_raw)
            data_path.write_bytes(blob)
            what = f"counts file {what}"
        elif r < 0.95:
            what, new_npy = _mutate_npy(rng, npy)
            data_path.write_bytes(_zstd(new_npy))
        else:
            data_path.unlink()
            what = "counts file missing"
        try:
            try:
                got = load_profile(path, T_A, n_rows=300)
            except TierStoreError:
                got = counts
            else:
                if got is None or got.dtype != np.int64 or not np.array_equal(got, counts):
                    return f"{what}: load_profile returned other counts than were saved"
            wrong = None
            try:
                wrong = _store_outcome(path, {T_A: refs[T_A]}, device_budget="2KiB", host_budget="4KiB")
            except TierStoreError:
                pass
            return f"{what}: store with this profile: {wrong}" if wrong else None
        finally:
            data_path.write_bytes(data_raw)
            meta_path.write_text(meta_text)

    run_mutants("profile", N_MUTANTS, 4, one)
