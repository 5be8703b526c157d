"""Cold disk tier: random rows straight from disk, page cache evicted before every measurement.

Measured in one run, every system on the store's own row file (LMDB: its copy), fresh random
row ids per system and round, the order of the systems rotated each round (rows of 128 B and 1 KiB):
- fio 4 KiB random read, O_DIRECT, libaio, on the rows region of the store's row file, at each
  queue depth of ``--depths`` (default 32 and 256): the device's random-read rate;
- ours: the store's own lookup path, ``Store.lookup(table, ids, out=)`` on a store built from
  the same bytes, with no cache tiers ("store") and with small device and host tiers under
  the default policy ("store+tiers", every row a miss that is admitted): page reads, checksum
  verification of every page (the ``.sum`` file is evicted too), gather, bookkeeping;
- the disk tier alone (``tierstore.tiers.disk.DiskTier.read`` on the store's row file, the
  code the store runs below its caches): its ``PageReader`` reads the pages holding the rows
  into the tier's reused page buffer, every page's checksum is verified, one vectorized
  gather fills a reused row buffer (every reader method, a fresh output, small batches):
  what the store's path costs beyond the reads;
- numpy.memmap gather (``np.take`` into the same reused row buffer) with
  ``madvise(MADV_RANDOM)`` (a fresh map each time, closed before eviction: a live map would
  keep its pages cached);
- LMDB ``txn.get`` per row with ``readahead=False`` (keys = row ids, values = rows, built
  once in the cache dir; its data file is evicted too).
Store, store+tiers and the disk tier run at each depth too (at most that many reads in flight,
``set_depth``), so each is compared with fio at the same queue depth.
Targets: the store >= 0.9x fio IOPS at the same queue depth, >= 3x memmap and LMDB rows/s.

The row file, its LMDB copies and a marker live in ``--cache-dir`` (default
$TIERSTORE_BENCH_CACHE or /tmp/tierstore_bench_cache) and are reused across runs.

    python -m benchmarks.bench_cold [--quick] [--table-size 4GiB] [--rows 50000] [--repeats 3]
                                    [--methods auto,fadvise,pread] [--depth 256] [--depths 32,256]
                                    [--systems store,store+tiers,ours,methods,fresh,batch,memmap,lmdb]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import lmdb
import numpy as np
import torch

import tierstore
from benchmarks.common import evict, fio, json_line, machine_info, print_header, resident_bytes
from tierstore.files import atomic_write
from tierstore.format.spec import PAGE_SIZE, read_manifest
from tierstore.sizes import format_size, parse_size
from tierstore.tiers.disk import DiskTier

# groups of systems --systems may pick ("ours", the first method's reader, always runs: it is the reference)
SYSTEM_GROUPS = ("store", "store+tiers", "ours", "methods", "fresh", "batch", "memmap", "lmdb")


# ----------------------------------------------------------------------------- data
def ensure_row_file(cache: Path, size: int) -> Path:
    """A file of ``size`` random bytes (fp16-like rows; content is irrelevant to cold reads), reused."""
    path = cache / f"rows_{size}.bin"
    if path.exists() and path.stat().st_size == size:
        return path
    rng = np.random.default_rng(1234)
    chunk = 64 << 20

    def write(f: BinaryIO) -> None:
        for off in range(0, size, chunk):
            f.write(rng.integers(0, 2**63, (min(chunk, size - off)) // 8, dtype=np.uint64).tobytes())

    return atomic_write(path, write)


def ensure_lmdb(cache: Path, row_file: Path, row_bytes: int) -> Path:
    """LMDB copy of the table: key = row id as 8 big-endian bytes, value = the row. Built once."""
    size = row_file.stat().st_size
    db = cache / f"lmdb_{size}_{row_bytes}"
    done = db / "complete"
    if done.exists():
        return db
    shutil.rmtree(db, ignore_errors=True)
    n_rows = size // row_bytes
    env = lmdb.open(str(db), map_size=int(size * 1.6) + (64 << 20), sync=False, metasync=False,
                    writemap=True, readahead=False)
    per = max(1, (64 << 20) // row_bytes)  # rows per transaction
    t0 = time.perf_counter()
    with open(row_file, "rb") as f:
        for lo in range(0, n_rows, per):
            hi = min(n_rows, lo + per)
            data = f.read((hi - lo) * row_bytes)
            keys = np.arange(lo, hi, dtype=">u8").tobytes()
            items = ((keys[8 * i:8 * i + 8], data[row_bytes * i:row_bytes * (i + 1)]) for i in range(hi - lo))
            with env.begin(write=True) as txn:
                txn.cursor().putmulti(items, append=True)
    env.sync(True)
    env.close()
    done.write_text(f"{n_rows} rows of {row_bytes} B built in {time.perf_counter() - t0:.1f} s\n")
    return db


def ensure_store(cache: Path, row_file: Path, row_bytes: int) -> Path:
    """A tierstore store whose one table holds the row file's bytes as float16 rows of
    ``row_bytes`` (built once through a safetensors copy of the file, which is then deleted)."""
    size = row_file.stat().st_size
    out = cache / f"store_{size}_{row_bytes}"
    if (out / "manifest.json").exists():
        return out
    ckpt = cache / f"ckpt_{size}_{row_bytes}.safetensors"
    header = json.dumps({"t": {"dtype": "F16", "shape": [size // row_bytes, row_bytes // 2],
                               "data_offsets": [0, size // row_bytes * row_bytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(ckpt, "wb") as f, open(row_file, "rb") as src:
        f.write(len(header).to_bytes(8, "little") + header)
        shutil.copyfileobj(src, f, 64 << 20)
    try:
        tierstore.build_store(ckpt, out, tables="^t$", force=True)
    finally:
        ckpt.unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------- systems
def set_depth(tier: Any, in_flight: int | None) -> None:
    """Make a disk tier keep at most ``in_flight`` reads in flight on a large batch. Its
    ``in_flight_per_depth`` reads per unit of its reader's depth: 1 with one AIO queue for the
    whole batch; 2 (older code, no such attribute) with two chunk calls at once, each
    ``depth`` deep. None: leave the reader as opened."""
    if in_flight is not None:
        tier.reader.depth = max(1, in_flight // getattr(tier, "in_flight_per_depth", 2))


def read_store(store: tierstore.RowStore, ids: np.ndarray, out: torch.Tensor, in_flight: int | None = None
               ) -> np.ndarray:
    """The store's own lookup path into a reused output; rows as raw bytes. ``in_flight``: the
    disk tier's bound on reads in flight (``set_depth``)."""
    set_depth(store._tables["t"].disk, in_flight)  # type: ignore[attr-defined]  # the benchmark's knob
    store.lookup("t", ids, out=out)
    return out.view(torch.uint8).numpy()


def row_pages(ids: np.ndarray, row_bytes: int) -> np.ndarray:
    """Sorted unique pages of the row file holding the rows at id*row_bytes: the reads every
    system needs, the numerator of its IOPS. (The disk tier reads as many when the row size
    divides a page, as the default sizes do: its rows sit at the same in-page offsets, one
    header page further on.)"""
    start = ids * row_bytes
    return np.union1d(start // PAGE_SIZE, (start + row_bytes - 1) // PAGE_SIZE)


def open_disk_tier(store: Path, *, method: str, threads: int | None, depth: int) -> DiskTier:
    """The store's disk tier for its one table, reading with PageReader ``method``."""
    return DiskTier(store, read_manifest(store).tables["t"], method=method, threads=threads, depth=depth)


def read_disk(tier: DiskTier, ids: np.ndarray, rows_out: np.ndarray | None = None,
              batch: int | None = None, depth: int | None = None) -> np.ndarray:
    """Rows ``ids`` (sorted unique) through the disk tier's ``read``, as raw bytes.

    ``rows_out``: a reused (len(ids), row_bytes) uint8 buffer (how the store calls it); None
    allocates a fresh one each call, which on this VM costs a page fault (~1.4 us of CPU) per
    4 KiB. ``batch``: one call per ``batch`` rows. ``depth``: reads in flight (``set_depth``;
    None: the tier's reader as opened).
    """
    set_depth(tier, depth)
    if rows_out is None:
        rows_out = np.empty((len(ids), tier.info.row_bytes), dtype=np.uint8)
    step = batch or max(1, len(ids))
    for i in range(0, len(ids), step):
        tier.read(ids[i:i + step], torch.from_numpy(rows_out[i:i + step]))
    return rows_out


def read_memmap(path: Path, ids: np.ndarray, row_bytes: int, rows_out: np.ndarray) -> np.ndarray:
    """numpy.memmap gather (np.take into a reused buffer), MADV_RANDOM; the map is closed before returning."""
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=PAGE_SIZE,  # the store's rows follow its header page
                   shape=((path.stat().st_size - PAGE_SIZE) // row_bytes, row_bytes))
    raw: mmap.mmap = mm._mmap  # type: ignore[attr-defined]
    raw.madvise(mmap.MADV_RANDOM)
    np.take(mm, ids, axis=0, out=rows_out)
    del mm
    raw.close()
    return rows_out


def read_lmdb(db: Path, keys: list[bytes], row_bytes: int) -> np.ndarray:
    """One ``txn.get`` per row, readahead off; the environment is closed before returning."""
    env = lmdb.open(str(db), readonly=True, lock=False, readahead=False, max_readers=4)
    try:
        with env.begin() as txn:
            get = txn.get
            vals = [get(k) for k in keys]
    finally:
        env.close()
    return np.frombuffer(b"".join(vals), dtype=np.uint8).reshape(len(keys), row_bytes)


def run_fio(path: Path, runtime: float, iodepth: int, row_bytes: int) -> dict[str, float] | None:
    """fio 4 KiB randread, O_DIRECT, libaio, queue depth ``iodepth`` on the rows region of the
    store's row file ``path`` (after its header page, whole pages); None when fio is not installed."""
    rows_region = (path.stat().st_size - PAGE_SIZE) // PAGE_SIZE * PAGE_SIZE
    return fio(path, rw="randread", bs="4k", iodepth=iodepth, runtime=runtime, size=rows_region, offset=PAGE_SIZE)


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="Cold random row reads vs fio, numpy.memmap and LMDB")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for the test)")
    ap.add_argument("--cache-dir", default=os.environ.get("TIERSTORE_BENCH_CACHE", "/tmp/tierstore_bench_cache"))
    ap.add_argument("--table-size", default="4GiB", help="row file size (bigger than readahead can absorb)")
    ap.add_argument("--row-bytes", default="128,1024")
    ap.add_argument("--rows", type=int, default=50000, help="random rows per measurement")
    ap.add_argument("--small-batch", default="32,512,2048", help="also read the rows in calls of these many rows")
    ap.add_argument("--repeats", type=int, default=3, help="fresh ids each repeat; medians reported")
    ap.add_argument("--fio-runtime", type=float, default=1.5, help="seconds per fio run (one before each measurement)")
    ap.add_argument("--threads", type=int, default=None, help="PageReader threads (default: per method)")
    ap.add_argument("--depth", type=int, default=256, help="PageReader depth of the tiers opened for the "
                    "systems with no --depths entry (methods, fresh, batch)")
    ap.add_argument("--depths", default="32,256",
                    help="reads in flight: fio's --iodepth and the bound on the disk tier's reads in flight for "
                         "store, store+tiers and ours (set_depth); the store's default is 256")
    ap.add_argument("--methods", default="auto,fadvise,pread", help="PageReader methods; the first is 'ours'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default=",".join(SYSTEM_GROUPS),
                    help=f"which systems to time, of {','.join(SYSTEM_GROUPS)} (ours always runs; skipping lmdb "
                         "skips building its copies)")
    args = ap.parse_args(argv)
    picked = set(args.systems.split(",")) | {"ours"}
    if not picked <= set(SYSTEM_GROUPS):
        ap.error(f"--systems: unknown {sorted(picked - set(SYSTEM_GROUPS))}; choose from {','.join(SYSTEM_GROUPS)}")
    if args.quick:
        args.table_size, args.rows, args.repeats, args.fio_runtime, args.small_batch = "48MiB", 1500, 1, 1.0, "256"
        args.depths = "32"

    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    size = parse_size(args.table_size) // PAGE_SIZE * PAGE_SIZE
    row_sizes = [int(x) for x in args.row_bytes.split(",")]
    small_batches = [int(x) for x in args.small_batch.split(",") if x]
    row_file = ensure_row_file(cache, size)
    dbs = {s: ensure_lmdb(cache, row_file, s) for s in row_sizes} if "lmdb" in picked else {}
    store_dirs = {s: ensure_store(cache, row_file, s) for s in row_sizes}
    stores = {s: {"store": tierstore.open(d, device="cpu"),
                  "store+tiers": tierstore.open(d, device="cpu", device_budget="1MiB", host_budget="4MiB")}
              for s, d in store_dirs.items()}
    methods = args.methods.split(",")
    if "methods" not in picked:
        methods = methods[:1]
    tiers = {s: {m: open_disk_tier(d, method=m, threads=args.threads, depth=args.depth) for m in methods}
             for s, d in store_dirs.items()}
    readers = {m: t.reader for m, t in tiers[row_sizes[0]].items()}  # every row size's tiers read alike
    names = {m: (m if m != "auto" else f"auto={r.method}") for m, r in readers.items()}
    ours = names[methods[0]]
    depths = [int(x) for x in args.depths.split(",")]
    ours_ref = f"{ours} d{depths[-1]}"  # the reference of the "ours x" column
    cold_files = [row_file] + [db / "data.mdb" for db in dbs.values()] + \
        [d / f for d in store_dirs.values() for f in ("tables/t0000.rows", "tables/t0000.sum")]
    # A reused output: how the store calls the tier (fresh memory costs a page fault per 4 KiB here).
    rows_buf = np.zeros(args.rows * max(row_sizes), dtype=np.uint8)

    evict(*cold_files)
    residue = {str(p.relative_to(cache)): resident_bytes(p) for p in cold_files}
    fio_line = (f"fio: randread 4 KiB, O_DIRECT, libaio, QD {args.depths}, {args.fio_runtime:g} s, on each store's "
                "row file (its rows region: --offset past the header page, --size to the last whole page), one "
                "run per depth per round, in the rotated order with the other systems"
                if shutil.which("fio") else "fio: NOT INSTALLED (apt-get install -y fio); fio ratios omitted")
    print_header("bench_cold: cold random rows from disk", machine_info(row_file), [
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (machine shared with other work)",
        f"table: {row_file} ({format_size(size)}), LMDB copies in {cache}",
        f"rows per measurement: {args.rows} (uniform, unique, sorted; fresh ids per system and round), "
        f"repeats: {args.repeats}, row sizes: {row_sizes} B",
        *[f"{names[m]}: DiskTier over {r!r} -> {'O_DIRECT' if r.direct else 'buffered'}" for m, r in readers.items()],
        f"ours = {ours}: the disk tier (DiskTier.read: page reads, checksums, gather); "
        "'+fresh' = same without out= (fresh output memory every call); "
        "'batchN' = the same rows in calls of N rows each; ' dN' = at most N reads in flight",
        fio_line,
        "eviction: fdatasync + posix_fadvise(DONTNEED) of the row file, the LMDB data files and the stores' row "
        "and checksum files before every "
        f"measurement, maps closed first; resident bytes after eviction (fincore): {residue}",
    ])

    rng = np.random.default_rng(args.seed)
    samples: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    def all_systems(s: int, rows_out: np.ndarray, out_t: torch.Tensor
                    ) -> list[tuple[str, str, int | None, Callable[[np.ndarray], Any]]]:
        """(group, name, reads in flight, read(ids)) of every system for rows of ``s`` bytes.
        fio's read ignores the ids and returns its result (a dict); it runs on the store's row file."""
        rf = store_dirs[s] / "tables/t0000.rows"
        per_depth = []
        for d in depths:
            per_depth += [("fio", f"fio QD{d}", d, lambda ids, d=d: run_fio(rf, args.fio_runtime, d, s))]
            per_depth += [(name, f"{name} d{d}", d, lambda ids, st=st, d=d: read_store(st, ids, out_t[:len(ids)], d))
                          for name, st in stores[s].items()]
            per_depth += [("ours", f"{ours} d{d}", d,
                           lambda ids, d=d: read_disk(tiers[s][methods[0]], ids, rows_out[:len(ids)], depth=d))]
        return [
            *per_depth,
            *[("methods", names[m], None, lambda ids, t=t: read_disk(t, ids, rows_out[:len(ids)]))
              for m, t in tiers[s].items() if m != methods[0]],
            ("fresh", f"{ours}+fresh", None, lambda ids: read_disk(tiers[s][methods[0]], ids)),
            *[("batch", f"{ours} batch{b}", None,
               lambda ids, b=b: read_disk(tiers[s][methods[0]], ids, rows_out[:len(ids)], batch=b))
              for b in small_batches],
            ("memmap", "memmap", None, lambda ids: read_memmap(rf, ids, s, rows_out[:len(ids)])),
            ("lmdb", "lmdb", None, lambda ids: read_lmdb(dbs[s], [int(i).to_bytes(8, "big") for i in ids], s)),
        ]

    mismatches = 0
    for rep in range(args.repeats):
        for s in row_sizes:
            n_rows_file = stores[s]["store"].manifest.tables["t"].rows
            rows_out = rows_buf[:args.rows * s].reshape(args.rows, s)
            out_t = torch.empty((args.rows, s // 2), dtype=torch.float16)
            systems = [(name, fn) for group, name, _, fn in all_systems(s, rows_out, out_t)
                       if group in picked or group == "fio"]
            k = rep % len(systems)  # rotate the order so that no system always runs first
            for name, fn in systems[k:] + systems[:k]:
                ids = np.unique(rng.integers(0, n_rows_file, args.rows))  # fresh ids per system and round
                evict(*cold_files)
                c0, t0 = time.process_time(), time.perf_counter()
                got = fn(ids)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                if got is None or isinstance(got, dict):  # fio (None: not installed)
                    if got is not None:
                        add(f"{s}/{name}/iops", got["iops"])
                        add(f"{s}/{name}/lat_us", got["lat_us"])
                    continue
                pages = row_pages(ids, s)
                add(f"{s}/{name}/rows_s", len(ids) / dt)
                add(f"{s}/{name}/iops", len(pages) / dt)
                add(f"{s}/{name}/cpu_us_row", cpu / len(ids) * 1e6)
                # bit-exact: every system against a plain memmap read of the store's row file
                got = got[:len(ids)].copy()
                ref = read_memmap(store_dirs[s] / "tables/t0000.rows", ids, s, rows_out[:len(ids)])
                bad = int((got != ref).any(axis=1).sum())
                if bad:
                    print(f"   MISMATCH: {name} differs from the row file on {bad} rows of {s} B")
                mismatches += bad
    for by_method in tiers.values():
        for t in by_method.values():
            t.close()
    for st in stores.values():
        for x in st.values():
            x.close()

    med = {k: float(np.median(v)) for k, v in samples.items()}
    out: dict[str, Any] = {
        "bench": "cold", "quick": args.quick, "table_bytes": size, "rows": args.rows, "repeats": args.repeats,
        "ours": ours_ref, "depths": depths,
        "readers": {names[m]: {"method": r.method, "direct": r.direct, "threads": r.threads,
                               "depth": r.depth} for m, r in readers.items()},
        "load_avg_end": os.getloadavg()[0], "mismatches": mismatches,
        "resident_after_evict": residue,  # bytes per file by fincore (None: not installed)
    }
    listed = [(group, name, d) for group, name, d, _ in all_systems(row_sizes[0], rows_buf[:0].reshape(0, 1), out_t)
              if group in picked or group == "fio"]
    sysnames = [name for group, name, _ in listed if group != "fio"]
    depth_of = {name: d for _, name, d in listed}
    for s in row_sizes:
        fio_at = {d: med.get(f"{s}/fio QD{d}/iops") for d in depths}
        print(f"\nrows of {s} B: {args.rows} random rows, fresh ids per system and round, medians of "
              f"{args.repeats} rounds; x fio = median IOPS / median IOPS of fio at the same reads in flight "
              f"(systems with no depth: fio QD{depths[0]}); CPU = process CPU time per row, all threads")
        for d in depths:
            if fio_at[d]:
                all_ = samples[f"{s}/fio QD{d}/iops"]
                print(f"   fio QD{d} O_DIRECT 4 KiB randread on the store's rows: median {fio_at[d]:,.0f} IOPS over "
                      f"{len(all_)} runs (min {min(all_):,.0f}, max {max(all_):,.0f}), mean latency "
                      f"{med[f'{s}/fio QD{d}/lat_us']:.0f} us")
        print(f"   {'system':<26} {'rows/s':>10} {'IOPS':>10} {'x fio':>7} {'ours x':>8} {'CPU us/row':>11}")
        ref_rows = med[f"{s}/{ours_ref}/rows_s"]
        x_fio: dict[str, float | None] = {}
        for name in sysnames:
            r, iops = med[f"{s}/{name}/rows_s"], med[f"{s}/{name}/iops"]
            f = fio_at[depth_of[name] if depth_of[name] is not None else depths[0]]
            x_fio[name] = iops / f if f else None
            vs_fio = f"{x_fio[name]:7.2f}" if f else "      -"
            print(f"   {name:<26} {r:>10,.0f} {iops:>10,.0f} {vs_fio} {ref_rows / r:>8.2f} "
                  f"{med[f'{s}/{name}/cpu_us_row']:>11.1f}")
        out[f"rows_{s}"] = {
            "fio_iops_qd32": fio_at.get(32),
            "fio_iops": {str(d): fio_at[d] for d in depths},
            "systems": {name: {"rows_s": med[f"{s}/{name}/rows_s"], "iops": med[f"{s}/{name}/iops"],
                               "in_flight": depth_of[name], "x_fio": x_fio[name],
                               "cpu_us_per_row": med[f"{s}/{name}/cpu_us_row"]} for name in sysnames},
            "store_vs_fio_iops": {str(d): x_fio.get(f"store d{d}") for d in depths},
            "store_tiers_vs_fio_iops": {str(d): x_fio.get(f"store+tiers d{d}") for d in depths},
            "store_vs_reader": med[f"{s}/store d{depths[-1]}/rows_s"] / ref_rows if "store" in picked else None,
            "ours_vs_fio_iops": x_fio[ours_ref],
            "ours_vs_memmap": ref_rows / med[f"{s}/memmap/rows_s"] if "memmap" in picked else None,
            "ours_vs_lmdb": ref_rows / med[f"{s}/lmdb/rows_s"] if "lmdb" in picked else None,
        }
    json_line(out)
    return out


if __name__ == "__main__":
    main()
