"""Building stores from real checkpoints and reading every row back, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import tierstore
from tierstore import CheckpointError, StoreExistsError, TierStoreError
from tierstore.format.spec import PAGE_SIZE, read_manifest

from ...conftest import bits, random_table

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]
REPO = Path(__file__).resolve().parents[3]


def _check_all_rows(store_path: Path, name: str, weight: torch.Tensor, *, budgets: tuple[int, int]) -> None:
    """Look up every row (shuffled, with duplicates, as a 2-D id tensor) through small tiers."""
    dev, host = budgets
    g = torch.Generator().manual_seed(0)
    n = weight.shape[0]
    ids = torch.cat([torch.randperm(n, generator=g), torch.randint(0, n, (n // 3,), generator=g)])
    ids = ids[: (len(ids) // 4) * 4].reshape(4, -1)
    with tierstore.open(store_path, device="cpu", device_budget=dev, host_budget=host) as store:
        got = store.lookup(name, ids)
        want = F.embedding(ids, weight)
        assert got.shape == want.shape and got.dtype == want.dtype
        diff = (bits(got) != bits(want)).sum().item()
        assert diff == 0, f"{diff} bytes differ from F.embedding for {name}"
        s = store.stats()
        if dev and dev < weight.nbytes:
            assert s["device"]["hits"] > 0 and s["device"]["misses"] > 0
        if host and host < weight.nbytes:
            assert s["disk"]["rows_read"] > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_round_trip_every_dtype(tmp_path, dtype, fmt):
    tensors = {
        "blocks.1.engram.memory.weight": random_table(5003, 64, dtype, seed=11),
        "blocks.2.engram.memory.weight": random_table(70001, 40 if dtype.itemsize > 1 else 128, dtype, seed=12),
        "head.weight": random_table(7, 3, dtype, seed=13),
    }
    if fmt == "safetensors":
        ckpt = tmp_path / "model.safetensors"
        save_file(tensors, str(ckpt))
    else:
        ckpt = tmp_path / "model.pt"
        torch.save(tensors, ckpt)
    out = tierstore.build_store(ckpt, tmp_path / "store", progress=False)
    m = read_manifest(out)
    assert sorted(m.tables) == ["blocks.1.engram.memory.weight", "blocks.2.engram.memory.weight"]
    for name, w in tensors.items():
        if name not in m.tables:
            continue
        info = m.tables[name]
        assert (info.rows, info.dim) == tuple(w.shape)
        assert info.torch_dtype == dtype
        assert os.path.getsize(out / info.file) % PAGE_SIZE == 0
        # budgets far below the table: the device cache, the host cache and the disk all serve rows
        # (a store splits its budgets over its tables by their bytes: give each table 1/20 and 1/5)
        total = sum(tensors[t].nbytes for t in m.tables)
        _check_all_rows(out, name, w, budgets=(total // 20, total // 5))
    assert tierstore.verify_store(out, progress=False).ok


@pytest.mark.slow
def test_large_odd_table_all_budgets(tmp_path):
    w = random_table(70001, 128, torch.float32, seed=5)
    ckpt = tmp_path / "m.safetensors"
    save_file({"x.engram.memory.weight": w}, str(ckpt))
    out = tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    for budgets in [(0, 0), (0, w.nbytes // 8), (w.nbytes // 16, 0), (w.nbytes // 16, w.nbytes // 4),
                    (w.nbytes, 0), (0, w.nbytes)]:
        _check_all_rows(out, "x.engram.memory.weight", w, budgets=budgets)


def test_sharded_safetensors_and_regex(tmp_path):
    a = random_table(300, 16, torch.float16, seed=1)
    b = random_table(500, 16, torch.bfloat16, seed=2)
    save_file({"l0.emb": a}, str(tmp_path / "s1.safetensors"))
    save_file({"l1.emb": b, "norm": torch.ones(16)}, str(tmp_path / "s2.safetensors"))
    index = {"metadata": {}, "weight_map": {"l0.emb": "s1.safetensors", "l1.emb": "s2.safetensors",
                                            "norm": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tierstore.build_store(tmp_path, tmp_path / "store", tables=r"\.emb$", progress=False)
    with tierstore.open(out, device_budget=0, host_budget=0) as store:
        assert torch.equal(bits(store.lookup("l0.emb", [0, 299, 5])), bits(a[[0, 299, 5]]))
        assert torch.equal(bits(store.lookup("l1.emb", np.array([[499], [0]]))), bits(b[torch.tensor([[499], [0]])]))


def test_dtype_conversion(tmp_path, small_ckpt):
    ckpt, tensors = small_ckpt
    out = tierstore.build_store(ckpt, tmp_path / "s", dtype="bfloat16", progress=False)
    name = "blocks.1.engram.memory.weight"
    with tierstore.open(out) as store:
        got = store.lookup(name, torch.arange(5003))
    assert torch.equal(bits(got), bits(tensors[name].to(torch.bfloat16)))


def test_no_table_lists_2d_tensors(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    save_file({"tok.weight": torch.zeros(10, 4), "bias": torch.zeros(4)}, str(ckpt))
    with pytest.raises(CheckpointError, match=r"tok\.weight \[10, 4\]") as e:
        tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    assert "--tables" in str(e.value)
    assert not (tmp_path / "s").exists()


def test_refuses_existing_out_unless_force(tmp_path, small_ckpt):
    ckpt, _ = small_ckpt
    out = tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    before = (out / "manifest.json").read_text()
    with pytest.raises(StoreExistsError, match="--force"):
        tierstore.build_store(ckpt, out, progress=False)
    assert (out / "manifest.json").read_text() == before
    tierstore.build_store(ckpt, out, force=True, progress=False, attach=[ckpt])
    assert read_manifest(out).attachments == ["model.safetensors"]
    assert not list(tmp_path.glob(".s.*"))  # no temporary or old directory left behind


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        tierstore.build_store(tmp_path / "nope.safetensors", tmp_path / "s")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 100)
    with pytest.raises(CheckpointError):
        tierstore.build_store(junk, tmp_path / "s")
    trunc = tmp_path / "trunc.safetensors"
    save_file({"a.engram.memory.weight": torch.zeros(100, 8)}, str(trunc))
    trunc.write_bytes(trunc.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        tierstore.build_store(trunc, tmp_path / "s")
    pickled = tmp_path / "evil.pt"
    torch.save({"a.engram.memory.weight": torch.zeros(3, 3), "obj": _NotATensor()}, pickled)
    with pytest.raises(CheckpointError, match="weights_only"):
        tierstore.build_store(pickled, tmp_path / "s")
    with pytest.raises(TierStoreError, match="dtype"):
        tierstore.build_store(trunc, tmp_path / "s", dtype="int4")
    assert not (tmp_path / "s").exists()


class _NotATensor:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def _big_checkpoint(path: Path, mib: int) -> None:
    """A safetensors file of ~mib MiB written a slice at a time (never whole in memory)."""
    rows, dim = mib * 1024 * 1024 // (256 * 4), 256
    header = json.dumps({"big.engram.memory.weight": {"dtype": "F32", "shape": [rows, dim],
                                                      "data_offsets": [0, rows * dim * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        step = 4096
        for s in range(0, rows, step):
            n = min(step, rows - s)
            f.write(np.arange(s * dim, (s + n) * dim, dtype=np.int64).astype(np.float32).tobytes())


def _run_build_subprocess(script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_mid_build_leaves_no_store_and_rerun_works(tmp_path):
    ckpt = tmp_path / "big.safetensors"
    _big_checkpoint(ckpt, 256)
    out = tmp_path / "store"
    proc = _run_build_subprocess(
        "import sys, tierstore; tierstore.build_store(sys.argv[1], sys.argv[2], progress=False)",
        str(ckpt), str(out))
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the build is really writing rows
        tmps = list(tmp_path.glob(".store.tmp-*/tables/*.rows"))
        if tmps and tmps[0].stat().st_size > 8 << 20:
            break
        time.sleep(0.01)
    else:
        pytest.fail("build never started writing")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not out.exists()
    with pytest.raises(TierStoreError):
        tierstore.open(out)
    for half in tmp_path.glob(".store.tmp-*"):  # the half-built directory does not open either
        with pytest.raises(TierStoreError, match="manifest"):
            tierstore.open(half)
    tierstore.build_store(ckpt, out, progress=False)
    assert not list(tmp_path.glob(".store.tmp-*")), "stale temporary directory not cleaned"
    with tierstore.open(out) as store:
        rows = store.lookup("big.engram.memory.weight", [0, 65535, 262143])
        assert rows[2, 0].item() == 262143 * 256


@pytest.mark.slow
def test_build_memory_is_bounded(tmp_path):
    """A 1 GiB checkpoint builds under an address-space cap of what the process had + 384 MiB."""
    ckpt = tmp_path / "big.safetensors"
    _big_checkpoint(ckpt, 1024)
    proc = _run_build_subprocess("""
        import resource, sys
        from tierstore import build_store  # loads torch and the builder before the cap is measured
        vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
        cap = vm + (384 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        build_store(sys.argv[1], sys.argv[2], progress=False)
        peak = int(next(l for l in open('/proc/self/status') if l.startswith('VmPeak')).split()[1]) * 1024
        print(peak - vm, cap - vm)
    """, str(ckpt), str(tmp_path / "s"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    grew, allowed = map(int, out.split())
    assert grew < allowed
    assert tierstore.verify_store(tmp_path / "s", progress=False).ok


def test_full_disk_is_a_clean_error(tmp_path, small_ckpt):
    """Writes past RLIMIT_FSIZE fail with EFBIG like a full disk: CapacityError, nothing left."""
    ckpt, _ = small_ckpt
    proc = _run_build_subprocess("""
        import resource, signal, sys
        import tierstore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            tierstore.build_store(sys.argv[1], sys.argv[2], progress=False)
        except tierstore.CapacityError as e:
            print("CapacityError", e)
    """, str(ckpt), str(tmp_path / "s"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.startswith("CapacityError") and "disk full" in out
    assert not (tmp_path / "s").exists()
    assert not list(tmp_path.glob(".s.*"))


def _write_safetensors(path: Path, header: dict | list | str, data: bytes) -> Path:
    """A safetensors file with a hand-written header (JSON object, or raw JSON text) and data."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


_TABLE = "a.engram.memory.weight"
_OTHER = "b.other"


def _two_tensor_header() -> tuple[dict, bytes]:
    """A valid header: table (4, 2) F32 at bytes 0:32, then another tensor (8,) F32 at 32:64."""
    header = {_TABLE: {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
              _OTHER: {"dtype": "F32", "shape": [8], "data_offsets": [32, 64]}}
    data = np.arange(16, dtype=np.float32).tobytes()
    return header, data


def test_header_shape_past_offsets_is_refused(tmp_path):
    """A shape claiming more rows than data_offsets span used to build rows from the next tensor."""
    header, data = _two_tensor_header()
    header[_TABLE]["shape"] = [8, 2]
    ckpt = _write_safetensors(tmp_path / "m.safetensors", header, data)
    with pytest.raises(CheckpointError, match=r"a\.engram\.memory\.weight.*shape \[8, 2\].*data_offsets \[0, 32\]"):
        tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_header_negative_shape_is_refused(tmp_path):
    """A negative dimension used to build a store that verify called ok and open refused."""
    header, data = _two_tensor_header()
    header[_TABLE]["shape"] = [-4, 2]
    ckpt = _write_safetensors(tmp_path / "m.safetensors", header, data)
    with pytest.raises(CheckpointError, match=r"a\.engram\.memory\.weight.*non-negative"):
        tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def _set(key, field, value):
    def mutate(h):
        h[key][field] = value
        return h
    return mutate


def _drop(key, field):
    def mutate(h):
        del h[key][field]
        return h
    return mutate


_MALFORMED = {
    "entry not an object": (lambda h: {**h, _TABLE: [1, 2]}, r"a\.engram.*expected an object"),
    "missing dtype": (_drop(_TABLE, "dtype"), r"a\.engram.*lacks dtype"),
    "missing data_offsets": (_drop(_OTHER, "data_offsets"), r"b\.other.*lacks data_offsets"),
    "dtype not a string": (_set(_TABLE, "dtype", 7), r"a\.engram.*dtype 7"),
    "shape not a list": (_set(_TABLE, "shape", "4,2"), r"a\.engram.*shape '4,2'"),
    "float in shape": (_set(_TABLE, "shape", [4.0, 2]), r"a\.engram.*shape \[4\.0, 2\]"),
    "bool in shape": (_set(_TABLE, "shape", [4, True]), r"a\.engram.*shape"),
    "null in shape": (_set(_TABLE, "shape", [None, 2]), r"a\.engram.*shape"),
    "2**64 in shape": (_set(_TABLE, "shape", [2**64, 2]), r"a\.engram.*needs more than 32 bytes"),
    "three offsets": (_set(_TABLE, "data_offsets", [0, 16, 32]), r"a\.engram.*data_offsets"),
    "float offset": (_set(_TABLE, "data_offsets", [0, 32.0]), r"a\.engram.*data_offsets"),
    "begin after end": (_set(_TABLE, "data_offsets", [32, 0]), r"a\.engram.*begin <= end"),
    "negative offset": (_set(_TABLE, "data_offsets", [-32, 0]), r"a\.engram.*data_offsets"),
    "offsets past the file": (_set(_OTHER, "data_offsets", [32, 2**64 + 32]), r"b\.other.*needs 32 bytes"),
    "data past the file": (lambda h: {**h, _OTHER: {"dtype": "F32", "shape": [16], "data_offsets": [32, 96]}},
                           r"truncated.*b\.other"),
    "overlapping tensors": (_set(_OTHER, "data_offsets", [24, 56]), r"a\.engram.*b\.other.*overlap"),
    "shape of another size": (_set(_OTHER, "dtype", "F64"), r"b\.other.*F64 \(8 bytes each\) needs 64"),
    "header a list": (lambda h: [h], r"JSON list, expected an object"),
    "metadata not strings": (lambda h: {"__metadata__": {"format": 1}, **h}, r"__metadata__"),
    "metadata a string": (lambda h: {"__metadata__": "pt", **h}, r"__metadata__"),
    "duplicate tensor": (lambda h: json.dumps(h)[:-1] + ", " + json.dumps(h)[1:], r"a\.engram.*twice"),
    "20000-digit number": (lambda h: json.dumps(h).replace("[4, 2]", "[" + "9" * 20000 + ", 2]"), r"not valid"),
    "deep nesting": (lambda h: json.dumps(h).replace("[4, 2]", "[" * 100000 + "]" * 100000), r"not valid"),
    "not UTF-8": (lambda h: json.dumps(h).replace('"F32"', '"F\udcff32"'), r"not valid"),
}


@pytest.mark.parametrize("case", list(_MALFORMED))
def test_malformed_header_is_a_checkpoint_error(tmp_path, case):
    mutate, match = _MALFORMED[case]
    header, data = _two_tensor_header()
    text = mutate(header)
    if case == "not UTF-8":
        raw = text.encode("utf-8", "surrogateescape")
        raw += b" " * (-len(raw) % 8)
        ckpt = tmp_path / "m.safetensors"
        ckpt.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    else:
        ckpt = _write_safetensors(tmp_path / "m.safetensors", text, data)
    with pytest.raises(CheckpointError, match=match) as e:
        tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    assert str(ckpt) in str(e.value)
    assert not (tmp_path / "s").exists()


def test_header_unknown_dtype_tag(tmp_path):
    """An unknown tag skips the size check; the build refuses it only if it is a selected table."""
    header, data = _two_tensor_header()
    header[_OTHER]["dtype"] = "F4"  # sub-byte: no whole element size
    header[_OTHER]["shape"] = [999]
    ckpt = _write_safetensors(tmp_path / "m.safetensors", header, data)
    out = tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    with tierstore.open(out) as store:
        assert store.lookup(_TABLE, [3]).tolist() == [[6.0, 7.0]]
    header[_TABLE]["dtype"] = "I32"  # known size, unsupported by the store
    _write_safetensors(ckpt, header, data)
    with pytest.raises(CheckpointError, match=r"a\.engram.*unsupported:I32; supported"):
        tierstore.build_store(ckpt, tmp_path / "s2", progress=False)


def _sharded(tmp_path: Path, weight_map: object) -> Path:
    save_file({_TABLE: torch.zeros(4, 2)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path


@pytest.mark.parametrize("weight_map, match", [
    ([_TABLE], "weight_map"),
    ({_TABLE: 1}, "weight_map"),
    ({_TABLE: "../s1.safetensors"}, r"'\.\./s1\.safetensors' is not a file name inside"),
    ({_TABLE: "/etc/passwd"}, r"'/etc/passwd' is not a file name inside"),
    ({_TABLE: "sub/../../s1.safetensors"}, "is not a file name inside"),
    ({_TABLE: "s2.safetensors"}, r"shard 's2\.safetensors' is missing"),
    ({_TABLE: ""}, "is not a file name inside"),
], ids=["list", "non-string", "dotdot", "absolute", "nested-dotdot", "missing", "empty"])
def test_bad_sharded_index(tmp_path, weight_map, match):
    ckpt = _sharded(tmp_path, weight_map)
    with pytest.raises(CheckpointError, match=match):
        tierstore.build_store(ckpt, tmp_path / "s", progress=False)


def test_sharded_index_not_an_object(tmp_path):
    ckpt = _sharded(tmp_path, {})
    (ckpt / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="weight_map"):
        tierstore.build_store(ckpt, tmp_path / "s", progress=False)


def test_invalid_tables_regex(tmp_path, small_ckpt):
    ckpt, _ = small_ckpt
    with pytest.raises(CheckpointError, match=r"--tables '\(emb' is not a valid regular expression \(missing \)"):
        tierstore.build_store(ckpt, tmp_path / "s", tables="(emb", progress=False)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("shape, what", [((8, 0), "value per row"), ((0, 8), "row"), ((0, 0), "value per row")])
def test_empty_tables_are_refused(tmp_path, fmt, shape, what):
    """A zero-width table used to fail with ZeroDivisionError; a zero-row one built, but its dim is
    bound by no data ([0, 2**40] ran the build out of memory), so both are refused."""
    tensors = {"t.engram.memory.weight": torch.zeros(shape), "x.engram.memory.weight": torch.ones(2, 2)}
    ckpt = tmp_path / ("m.safetensors" if fmt == "safetensors" else "m.pt")
    if fmt == "safetensors":
        save_file(tensors, str(ckpt))
    else:
        torch.save(tensors, ckpt)
    with pytest.raises(CheckpointError, match=rf"'t\.engram\.memory\.weight' has shape \[{shape[0]}, {shape[1]}\]"
                                              rf": a table needs at least one {what}; leave it out with --tables"):
        tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    out = tierstore.build_store(ckpt, tmp_path / "s", tables=r"^x\.", progress=False)
    assert tierstore.verify_store(out, progress=False).ok


def test_empty_table_with_huge_dim_is_refused(tmp_path):
    header = {_TABLE: {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}}
    ckpt = _write_safetensors(tmp_path / "m.safetensors", header, b"")
    with pytest.raises(CheckpointError, match="at least one row"):
        tierstore.build_store(ckpt, tmp_path / "s", progress=False)

# -- concurrent builds, crash recovery, leftovers, typed errors --------------------------

_RACER = """
    import sys, time
    from pathlib import Path
    import tierstore
    ckpt, base, me, rounds = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    for r in range(rounds):
        (base / f"ready-{r}-{me}").touch()
        while len(list(base.glob(f"ready-{r}-*"))) < 2:  # a barrier: both start together
            time.sleep(0.0005)
        try:
            tierstore.build_store(ckpt, base / f"s{r}", progress=False)
            print("ok", flush=True)
        except tierstore.StoreExistsError:
            print("exists", flush=True)
"""


@pytest.mark.slow
def test_concurrent_builds_of_a_new_out_have_one_winner(tmp_path, small_ckpt):
    """Two processes build the same new OUT at the same moment, many times: each time exactly
    one succeeds, the other raises StoreExistsError, and the survivor is a whole store."""
    ckpt, tensors = small_ckpt
    base = tmp_path / "race"
    base.mkdir()
    rounds = 12
    procs = [_run_build_subprocess(_RACER, str(ckpt), str(base), me, str(rounds)) for me in "ab"]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        results.append(out.split())
    name = "blocks.3.engram.memory.weight"
    for r in range(rounds):
        got = sorted(res[r] for res in results)
        assert got == ["exists", "ok"], f"round {r}: {got}"
        assert tierstore.verify_store(base / f"s{r}", progress=False).ok
        with tierstore.open(base / f"s{r}") as store:
            assert torch.equal(bits(store.lookup(name, [0, 1200])), bits(tensors[name][[0, 1200]]))
    assert not [p.name for p in base.iterdir() if p.name.startswith(".")], "leftovers of the race"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_open_restores_a_store_a_force_build_left_mid_swap(tmp_path, small_ckpt):
    """A --force build killed between its two renames leaves no OUT, only .OUT.old-PID: the next
    open gives the old store back and removes the dead build's temporary directory."""
    ckpt, tensors = small_ckpt
    out = tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    pid = _dead_pid()
    os.rename(out, tmp_path / f".s.old-{pid}")  # what the crash leaves: the old store moved aside
    (tmp_path / f".s.tmp-{pid}" / "tables").mkdir(parents=True)  # and the new, unfinished one
    name = "blocks.1.engram.memory.weight"
    with tierstore.open(out) as store:
        assert torch.equal(bits(store.lookup(name, [5002])), bits(tensors[name][[5002]]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "s"]
    assert tierstore.verify_store(out, progress=False).ok


def test_build_restores_then_refuses_or_replaces(tmp_path, small_ckpt):
    ckpt, _ = small_ckpt
    out = tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    pid = _dead_pid()
    os.rename(out, tmp_path / f".s.old-{pid}")
    with pytest.raises(StoreExistsError):  # the old store is back, so OUT exists
        tierstore.build_store(ckpt, out, progress=False)
    assert tierstore.verify_store(out, progress=False).ok
    os.rename(out, tmp_path / f".s.old-{pid}")
    tierstore.build_store(ckpt, out, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "s"]


def test_open_removes_leftovers_of_dead_builds_only(tmp_path, small_ckpt):
    """Beside a store that exists, dead builds' .tmp and .old directories go at the next open;
    a running build's (same PID, same start time) and other stores' stay."""
    from tierstore.format.recovery import leftover_tag as _tag

    ckpt, _ = small_ckpt
    out = tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    pid = _dead_pid()
    dead = [f".s.tmp-{pid}", f".s.old-{pid}", f".s.tmp-{pid}-123-0",
            f".s.tmp-{os.getpid()}-1-0"]  # our PID but another start time: a reused PID
    live = [f".s.tmp-{_tag()}", f".t.tmp-{pid}"]
    for d in dead + live:
        (tmp_path / d).mkdir()
    (tmp_path / f".s.old-{pid}" / "manifest.json").write_text("{}")
    tierstore.open(out).close()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == sorted(live)


def test_find_orphans_and_gc_command(tmp_path, small_ckpt, capsys, monkeypatch):
    from tierstore.format.recovery import find_orphans
    from tierstore_cli.cli import main

    ckpt, _ = small_ckpt
    a = tierstore.build_store(ckpt, tmp_path / "a", progress=False)
    tierstore.build_store(ckpt, tmp_path / "b", progress=False)
    pid = _dead_pid()
    os.rename(a, tmp_path / f".a.old-{pid}-7-0")
    (tmp_path / f".b.tmp-{pid}-7-1").mkdir()
    (tmp_path / ".c.tmp-1").mkdir()  # PID 1 is alive: never touched
    (tmp_path / f".d.tmp-{pid}").write_text("a file left by a dead process")  # files are leftovers too
    (tmp_path / ".e.tmp-1").write_text("a file of a live process")
    found = {o.path.name: (o.kind, o.store.name, o.pid, o.action) for o in find_orphans(tmp_path)}
    assert found == {f".a.old-{pid}-7-0": ("old", "a", pid, "restore"),
                     f".b.tmp-{pid}-7-1": ("tmp", "b", pid, "remove"),
                     f".d.tmp-{pid}": ("tmp", "d", pid, "remove")}
    monkeypatch.chdir(tmp_path)
    assert main(["gc", "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dry_run"] and sorted(i["action"] for i in doc["items"]) == ["remove", "remove", "restore"]
    assert not a.exists()
    assert main(["gc", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"restored {a}") and all(x.startswith("removed") for x in lines[1:])
    assert tierstore.verify_store(a, progress=False).ok
    assert find_orphans(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".c.tmp-1", ".e.tmp-1"]
    assert main(["gc", str(tmp_path / "missing")]) == 2


def test_publish_without_renameat2(tmp_path, small_ckpt, monkeypatch):
    """The fallback where renameat2 is missing (claim OUT with mkdir) also refuses an OUT that
    appeared while the build ran."""
    import tierstore.format.build as build
    import tierstore.format.recovery as recovery

    ckpt, _ = small_ckpt
    monkeypatch.setattr(recovery, "_RENAMEAT2", None)
    out = tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    assert tierstore.verify_store(out, progress=False).ok
    real = build._check_attachment  # runs after the up-front exists check: make OUT appear then

    def sneak(path):
        (tmp_path / "t").mkdir(exist_ok=True)
        real(path)

    monkeypatch.setattr(build, "_check_attachment", sneak)
    with pytest.raises(StoreExistsError, match="another build"):
        tierstore.build_store(ckpt, tmp_path / "t", progress=False, attach=[ckpt])
    assert list((tmp_path / "t").iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_out_under_a_file_is_a_store_io_error(tmp_path, small_ckpt):
    from tierstore import StoreIOError
    from tierstore_cli.cli import main

    ckpt, _ = small_ckpt
    f = tmp_path / "afile"
    f.write_text("x")
    for out in (f / "s", f / "x" / "s"):
        with pytest.raises(StoreIOError, match="not a directory"):
            tierstore.build_store(ckpt, out, progress=False)
    assert main(["build", str(ckpt), str(f / "s"), "--quiet"]) == 2


def test_unwritable_parent_is_a_store_io_error(read_only_dir, small_ckpt):
    from tierstore import StoreIOError

    ckpt, _ = small_ckpt
    for out in (read_only_dir / "s", read_only_dir / "sub" / "s"):
        with pytest.raises(StoreIOError, match="permission|not permitted"):
            tierstore.build_store(ckpt, out, progress=False)
    assert list(read_only_dir.iterdir()) == []


def test_bad_attachments_are_store_io_errors(tmp_path, small_ckpt, monkeypatch):
    from tierstore import StoreIOError

    ckpt, _ = small_ckpt
    with pytest.raises(StoreIOError, match="does not exist") as e:
        tierstore.build_store(ckpt, tmp_path / "s", attach=[tmp_path / "nope.json"], progress=False)
    assert e.value.errno == 2
    with pytest.raises(StoreIOError, match="not a regular file"):
        tierstore.build_store(ckpt, tmp_path / "s", attach=[tmp_path], progress=False)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    if os.geteuid() != 0:
        secret.chmod(0)
    else:  # root reads any file: make opening this one fail as it would for anyone else
        import builtins

        real_open = builtins.open

        def guarded(file, *a, **k):
            if os.fspath(file) == os.fspath(secret):
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return real_open(file, *a, **k)

        monkeypatch.setattr(builtins, "open", guarded)
    with pytest.raises(StoreIOError, match="attachment"):
        tierstore.build_store(ckpt, tmp_path / "s", attach=[secret], progress=False)
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.*"))


def test_a_killed_unreaped_build_counts_as_dead(tmp_path, small_ckpt):
    """A build killed but not yet waited for is a zombie: its PID exists, its leftovers are dead."""
    ckpt, _ = small_ckpt
    out = tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".s.tmp-{p.pid}").mkdir()
        p.kill()
        while Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        assert len(tierstore.format.recovery.recover(out)) == 1
        assert not (tmp_path / f".s.tmp-{p.pid}").exists()
    finally:
        p.kill()
        p.wait()
