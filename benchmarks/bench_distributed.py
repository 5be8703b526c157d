"""Sharded store on torch.distributed (gloo, loopback): lookups/s and bytes exchanged per lookup
for 1, 2 and 4 ranks, with the single-process store as the baseline in the same run; and
the id dedup ratio of real Engram traffic (Python stdlib text), which sets the bytes per
token a sharded deployment puts on the network.

    python -m benchmarks.bench_distributed [--quick] [--table-mib 64] [--ids 16384] [--batches 20]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tierstore
from tierstore import build_shard, open_sharded

from .common import json_line, machine_info, print_header
from .workloads import CACHE, table_store, zipf_ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(rows: int, n_ids: int, batches: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [zipf_ids(rows, n_ids, 1.0, rng) for _ in range(batches)]


def timed_lookups(store: tierstore.RowStore, name: str, work: list[np.ndarray], *, warm: int = 2,
                  barrier: bool = False) -> float:
    """Seconds for the lookups of ``work[warm:]`` after ``warm`` untimed ones: the same code
    for the single-process store and each rank of the sharded one (any ``RowStore``)."""
    for ids in work[:warm]:
        store.lookup(name, ids)
    store.reset_stats()
    if barrier:
        dist.barrier()
    t0 = time.perf_counter()
    for ids in work[warm:]:
        store.lookup(name, ids)
    return time.perf_counter() - t0


def _rank_main(rank: int, world: int, port: int, store: str, name: str, rows: int, n_ids: int, batches: int,
               result: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the cores, split between the ranks
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    sharded = Path(store) / "sharded"
    build_shard(Path(store) / "ckpt.safetensors", sharded, rank, world, progress=False, force=True)
    dist.barrier()
    work = _batches(rows, n_ids, batches + 2, seed=100 + rank)
    with open_sharded(sharded, device="cpu", host_budget="8GiB") as s:  # every shard resident: measure the exchange
        dt = timed_lookups(s, name, work, barrier=True)
        ex = s.stats()["exchange"]
    totals = torch.tensor([dt, ex["bytes_sent"], ex["ids_requested"], ex["ids_sent"]], dtype=torch.float64)
    gathered = [torch.zeros_like(totals) for _ in range(world)]
    dist.all_gather(gathered, totals)
    if rank == 0:
        g = torch.stack(gathered)
        wall = float(g[:, 0].max())
        Path(result).write_text(json.dumps({
            "ranks": world, "lookups_per_s_total": world * batches / wall,
            "ids_per_s_total": float(g[:, 2].sum()) / wall,
            "bytes_sent_per_lookup": float(g[:, 1].sum()) / (world * batches),
            "bytes_sent_per_id": float(g[:, 1].sum()) / float(g[:, 2].sum()),
            "dedup_ratio": float(g[:, 3].sum()) / float(g[:, 2].sum()),
        }))
    dist.destroy_process_group()


def real_text_dedup(batch_seqs: list[int], seq_len: int, max_bytes: int) -> list[dict]:
    """Unique/total row ids per Engram table for batches of real text (16K BPE on stdlib source)."""
    from engram_model.compression import build_compression
    from engram_model.hasher import NgramHasher
    from engram_model.tokenizer import stdlib_text_files, train_tokenizer

    files = stdlib_text_files()
    tok = train_tokenizer(files, vocab_size=16384, max_bytes=max_bytes)
    cmap = build_compression(tok)
    pad = int(cmap.lookup[tok.token_to_id("<|pad|>")])
    hasher = NgramHasher(cmap.num_compressed, 3, 8, layer_ids=[1], pad_id=pad)
    ids: list[int] = []
    for f in files[::7]:
        ids.extend(tok.encode(f.read_text(errors="replace")).ids)
        if len(ids) > max(batch_seqs) * seq_len * 4:
            break
    arr = cmap(np.asarray(ids, dtype=np.int64))
    out = []
    for b in batch_seqs:
        n = b * seq_len
        rows = hasher.hash(arr[:n].reshape(b, seq_len))[1]  # (B, T, 16)
        per_head = [len(np.unique(rows[..., h])) / n for h in range(rows.shape[-1])]
        out.append({"batch_seqs": b, "seq_len": seq_len, "lookups": int(rows.size),
                    "unique_fraction_mean": float(np.mean(per_head)),
                    "unique_fraction_2gram": float(np.mean(per_head[:8])),
                    "unique_fraction_3gram": float(np.mean(per_head[8:]))})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--table-mib", type=int, default=64)
    ap.add_argument("--ids", type=int, default=16384)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--cache-dir", type=Path, default=CACHE)
    ap.add_argument("--no-text", action="store_true", help="skip the real-text dedup measurement")
    args = ap.parse_args(argv)
    if args.quick:
        args.table_mib, args.ids, args.batches, args.ranks = 2, 1024, 3, "1,2"
    print_header("sharded store over gloo (loopback), Zipf(1.0) ids, shards resident in the host tier",
                 machine_info(args.cache_dir.parent if args.cache_dir.exists() else Path(".")),
                 [f"torch {torch.__version__}, {os.cpu_count()} cores split between the ranks"])
    row_bytes, dim = 256, 128
    rows = args.table_mib * 2**20 // row_bytes
    store, name = table_store(rows, dim, torch.bfloat16, cache=args.cache_dir)
    # the benchmark's ranks build their shards from a checkpoint of the same table
    ckpt = store / "ckpt.safetensors"
    if not ckpt.exists():
        from safetensors.torch import save_file
        with tierstore.open(store, device="cpu") as s:
            save_file({name: s.lookup(name, torch.arange(rows))}, str(ckpt))
    work = _batches(rows, args.ids, args.batches + 2, seed=100)
    with tierstore.open(store, device="cpu", host_budget="8GiB") as s:
        base = args.batches / timed_lookups(s, name, work)
    print(f"single-process store: {base:.1f} lookups/s of {args.ids} ids ({base * args.ids / 1e6:.2f} M ids/s)")
    results = []
    for world in (int(x) for x in args.ranks.split(",")):
        res_file = args.cache_dir / f"dist-{world}.json"
        mp.spawn(_rank_main, args=(world, _free_port(), str(store), name, rows, args.ids, args.batches, str(res_file)),
                 nprocs=world, join=True)
        r = json.loads(res_file.read_text())
        r["ratio_vs_single_process"] = r["lookups_per_s_total"] / base
        results.append(r)
        print(f"{world} rank(s): {r['lookups_per_s_total']:.1f} lookups/s in total "
              f"({r['ratio_vs_single_process']:.2f}x single), {r['bytes_sent_per_lookup'] / 1e6:.2f} MB sent per lookup "
              f"({r['bytes_sent_per_id']:.1f} B per id, unique fraction {r['dedup_ratio']:.3f})")
    text = [] if args.no_text else real_text_dedup([1, 8, 64] if not args.quick else [1, 2], 512,
                                                   max_bytes=(8 << 20) if not args.quick else (1 << 20))
    for t in text:
        print(f"real text, {t['batch_seqs']} x {t['seq_len']} tokens: unique row ids per table = "
              f"{t['unique_fraction_mean']:.3f} of lookups (2-gram {t['unique_fraction_2gram']:.3f}, "
              f"3-gram {t['unique_fraction_3gram']:.3f})")
    res = {"benchmark": "distributed", "ids_per_lookup": args.ids, "row_bytes": row_bytes, "table_mib": args.table_mib,
           "single_process_lookups_per_s": base, "ranks": results, "real_text_dedup": text}
    json_line(res)
    return res


if __name__ == "__main__":
    main()
