"""Fuzzing the safetensors reader: a mutated checkpoint either fails with a TierStoreError or
builds a store whose every row equals the bytes an independent reader finds in the file.

The mutator is seeded (``random.Random``), so a failing case replays from its seed and index.
The reference reader below is written from the safetensors spec with plain json + struct and
shares no code with tierstore: it decides on its own whether the file is well formed and which
bytes each table holds.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

import tierstore
from tierstore import TierStoreError

from ...conftest import bits, random_table

TABLES = r"engram\.memory\.weight$"
CASES_PER_SEED = 100
SEEDS = [0, 1, 2]

# the spec's element sizes; sub-byte tags (F4, F6_*) have none and skip the size check
_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
          "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_STORABLE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_WEIRD_NUMBERS = [-1, -8, 0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 2**64 + 8, 10**30, 1.5, -0.0, 1e300,
                  "8", None, True, [], {}]
_TAGS = ["F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I32", "U8", "F64", "BOOL", "F4", "F6_E2M3", "XYZ", "",
         7, None, ["F32"]]


# --- the reference: what a correct reader must conclude about a file ------------------------------

class Malformed(Exception):
    pass


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise Malformed("duplicate key")
    return dict(pairs)


def _int(v) -> bool:
    return type(v) is int


def reference_tables(raw: bytes) -> dict[str, tuple[str, tuple[int, int], bytes]]:
    """{table: (dtype tag, (rows, dim), data bytes)} for the tables a build must store, or
    Malformed when a correct reader must refuse the file (or no table can be built)."""
    if len(raw) < 8:
        raise Malformed("no length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > 100 * 1024 * 1024 or 8 + n > len(raw):
        raise Malformed("header length")
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        raise Malformed(f"json: {e}") from None
    if not isinstance(header, dict):
        raise Malformed("header not an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or any(not isinstance(v, str) for v in meta.values()):
        raise Malformed("metadata")
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise Malformed(f"{name}: entry")
        tag, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(tag, str):
            raise Malformed(f"{name}: dtype")
        if not isinstance(shape, list) or not all(_int(d) and d >= 0 for d in shape):
            raise Malformed(f"{name}: shape")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_int(o) for o in offs):
            raise Malformed(f"{name}: offsets")
        begin, end = offs
        if not 0 <= begin <= end or 8 + n + end > len(raw):
            raise Malformed(f"{name}: offsets range")
        if tag in _SIZES and math.prod(shape) * _SIZES[tag] != end - begin:
            raise Malformed(f"{name}: size")
        spans.append((begin, end))
    spans = sorted(s for s in spans if s[0] < s[1])
    if any(b1 < e0 for (_, e0), (b1, _) in zip(spans, spans[1:])):
        raise Malformed("overlap")
    tables = {}
    for name, e in header.items():
        if not re.search(TABLES, name):
            continue
        shape = e["shape"]
        if len(shape) != 2 or e["dtype"] not in _STORABLE or 0 in shape:
            raise Malformed(f"{name}: not a storable table")
        begin, end = e["data_offsets"]
        tables[name] = (e["dtype"], (shape[0], shape[1]), raw[8 + n + begin : 8 + n + end])
    if not tables:
        raise Malformed("no table")
    return tables


# --- the mutator ----------------------------------------------------------------------------------

def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict | bytes, data: bytes) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__" and isinstance(header[k], dict)]


def mutate(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of a file (valid or already mutated); returns the mutant and what was done."""
    kind = rng.choice(["flip", "insert", "delete", "number", "number", "consistent", "consistent", "consistent",
                       "swap", "truncate", "dtype", "length", "metadata", "drop-key"])
    try:
        return _mutate(raw, rng, kind)
    except Exception:  # a structured edit of an already broken header: fall back to a byte flip
        return _mutate(raw, rng, "flip")


def _mutate(raw: bytes, rng: random.Random, kind: str) -> tuple[bytes, str]:
    if kind in ("flip", "insert", "delete"):
        n = struct.unpack("<Q", raw[:8])[0]
        text = bytearray(raw[8 : 8 + n])
        if not text:
            return raw[:-1], "drop the last byte"
        pos = rng.randrange(len(text))
        if kind == "flip":  # keeps the length prefix
            text[pos] ^= 1 << rng.randrange(8)
            return raw[:8] + bytes(text) + raw[8 + n :], f"flip a bit of header byte {pos}"
        if kind == "insert":
            text[pos:pos] = bytes([rng.choice(b'{}[],:"0123456789-.e \\' + bytes([rng.randrange(256)]))])
        else:
            del text[pos : pos + rng.randint(1, 3)]
        return _join(bytes(text), raw[8 + n :]), f"{kind} at header byte {pos}"
    if kind == "truncate":
        cut = rng.randrange(len(raw))
        return raw[:cut], f"truncate at {cut}"
    if kind == "length":
        (n,) = struct.unpack("<Q", raw[:8])
        new = rng.choice([0, n - 1, n + 1, n + 8, n - 8, len(raw), 2**63, 100 * 1024 * 1024 + 1])
        return struct.pack("<Q", new % 2**64) + raw[8:], f"header length {new}"
    header, data = _split(raw)
    names = _tensor_names(header)
    name = rng.choice(names) if names else None
    if kind == "number" and name is not None:
        field = rng.choice(["shape", "data_offsets"])
        values = header[name][field]
        i = rng.randrange(len(values)) if values else 0
        new = rng.choice(_WEIRD_NUMBERS + [rng.randint(-64, 4096), values[i] + rng.randint(-9, 9) if values else 0])
        if values:
            values[i] = new
        else:
            header[name][field] = [new]
        return _join(header, data), f"{name}.{field}[{i}] = {new!r}"
    if kind == "consistent" and name is not None:
        # a valid edit: fewer rows, the end offset moved to match (tests that offsets are honoured)
        e = header[name]
        rows = rng.randint(0, e["shape"][0]) if e["shape"] else 0
        if e["shape"]:
            e["shape"][0] = rows
        per = math.prod(e["shape"][1:]) * _SIZES[e["dtype"]]
        shift = rng.choice([0, 0, per, 2 * per])
        e["data_offsets"] = [e["data_offsets"][0] + shift, e["data_offsets"][0] + shift + rows * per]
        return _join(header, data), f"{name}: {rows} rows at offset +{shift}"
    if kind == "swap" and len(names) >= 2:
        a, b = rng.sample(names, 2)
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        return _join(header, data), f"swap offsets of {a} and {b}"
    if kind == "dtype" and name is not None:
        tag = rng.choice(_TAGS)
        header[name]["dtype"] = tag
        return _join(header, data), f"{name}.dtype = {tag!r}"
    if kind == "metadata":
        meta = rng.choice([{"format": "pt"}, {"format": 1}, "pt", None, [], {"a": None}])
        return _join({"__metadata__": meta, **header}, data), f"__metadata__ = {meta!r}"
    if kind == "drop-key" and name is not None:
        key = rng.choice(["dtype", "shape", "data_offsets"])
        del header[name][key]
        return _join(header, data), f"{name}: no {key}"
    return raw, "unchanged"


# --- the test -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "base.safetensors"
    save_file({
        "blocks.1.engram.memory.weight": random_table(37, 8, torch.float32, seed=1),
        "blocks.2.engram.memory.weight": random_table(19, 16, torch.bfloat16, seed=2),
        "norm.weight": random_table(24, 1, torch.float16, seed=3).reshape(24),
    }, str(path), metadata={"format": "pt"})
    return path.read_bytes()


@pytest.mark.parametrize("seed", SEEDS)
def test_mutated_checkpoints_fail_typed_or_build_exact_rows(tmp_path, base_checkpoint, seed):
    rng = random.Random(seed)
    built = refused = 0
    for case in range(CASES_PER_SEED):
        raw, what = base_checkpoint, []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            raw, done = mutate(raw, rng) if len(raw) >= 8 else (raw, "")
            what.append(done)
        where = f"seed {seed} case {case} ({'; '.join(what)})"
        ckpt, out = tmp_path / "m.safetensors", tmp_path / f"s{case}"
        ckpt.write_bytes(raw)
        try:
            want = reference_tables(raw)
        except Malformed as e:
            want, why = None, str(e)
        try:
            tierstore.build_store(ckpt, out, tables=TABLES, progress=False)
        except TierStoreError as e:
            assert want is None, f"{where}: the reference reads it as well formed, the build raised {e!r}"
            refused += 1
            continue
        except Exception as e:  # noqa: BLE001 - any other type is the bug this test looks for
            pytest.fail(f"{where}: build raised {type(e).__name__}: {e}")
        assert want is not None, f"{where}: built a store from a file the reference refuses ({why})"
        assert tierstore.verify_store(out, progress=False).ok, where
        with tierstore.open(out, device="cpu") as store:
            for name, (tag, (rows, dim), data) in want.items():
                got = store.lookup(name, torch.arange(rows))
                assert got.dtype == _STORABLE[tag] and tuple(got.shape) == (rows, dim), where
                ref = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                diff = (bits(got).reshape(-1) != ref).sum().item()
                assert diff == 0, f"{where}: {name}: {diff} of {len(data)} bytes differ from the file"
        shutil.rmtree(out)
        built += 1
    # both outcomes must really be exercised, or the test proves nothing
    assert built >= CASES_PER_SEED // 10 and refused >= CASES_PER_SEED // 10, (built, refused)
