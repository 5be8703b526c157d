"""Hasher throughput: token positions hashed per second per Engram layer.

Baseline (same process): the public reference demo's straightforward numpy spelling
(np.pad per shift, int64 ``%`` per head, np.stack). Ours: engram_model.NgramHasher
(uint64 remainder as x - (x // p) * p with numpy's libdivide scalar division, chunks of
16K positions, written straight into the output; one thread).
Both run on the same compressed ids from the real stdlib text; outputs are compared
element by element. Target: >= 10M positions/s per layer.

    python -m benchmarks.bench_hasher [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch

from engram_model.hasher import NgramHasher
from engram_model.tokenizer import iter_texts, stdlib_text_files, train_tokenizer
from engram_model.compression import build_compression

from .common import best_of, json_line


def reference_numpy_hash(h: NgramHasher, x: np.ndarray, layer_id: int) -> np.ndarray:
    """The demo's `_get_ngram_hashes`, restated (baseline)."""
    B, T = x.shape
    m = h.multipliers[layer_id]
    shifts = [x if k == 0 else np.pad(x, ((0, 0), (k, 0)), constant_values=h.pad_id)[:, :T]
              for k in range(h.max_ngram_size)]
    heads = []
    for n in range(2, h.max_ngram_size + 1):
        mix = shifts[0] * m[0]
        for k in range(1, n):
            mix = np.bitwise_xor(mix, shifts[k] * m[k])
        for p in h.table_sizes[layer_id][n - 2]:
            heads.append(mix % int(p))
    return np.stack(heads, axis=2)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description="Engram hasher throughput")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (for the test)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the hasher itself is numpy, 1 thread)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=131072)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.repeats = 2, 2048, 2
    torch.set_num_threads(args.threads)

    # real ids: stdlib text through a small BPE and the compression map
    tok = train_tokenizer(vocab_size=2048 if args.quick else 8192, max_bytes=(1 << 20) if args.quick else (4 << 20))
    cmap = build_compression(tok)
    need = args.batch * args.seq
    ids: list[int] = []
    for text in iter_texts(stdlib_text_files()):
        ids.extend(tok.encode(text).ids)
        if len(ids) >= need:
            break
    raw = np.array((ids * (need // max(1, len(ids)) + 1))[:need], dtype=np.int64).reshape(args.batch, args.seq)
    x = cmap(raw)
    V = cmap.num_compressed
    h = NgramHasher(V, 3, 8, base_sizes=[5 * V, 5 * V], layer_ids=[1, 3], pad_id=int(cmap.lookup[1]))
    L = h.layer_ids[0]

    ref = reference_numpy_hash(h, x, L)
    ours = h.hash(x)[L]
    mismatches = int((ref != ours).sum())

    positions = args.batch * args.seq
    t_ref = best_of(lambda: reference_numpy_hash(h, x, L), args.repeats)
    t_ours_all = best_of(lambda: h.hash(x), args.repeats)  # all layers, shifts shared
    t_ours = t_ours_all / len(h.layer_ids)
    res = {
        "bench": "hasher",
        "quick": args.quick,
        "threads": args.threads,
        "positions": positions,
        "heads_per_layer": h.heads_per_layer,
        "compressed_vocab": V,
        "baseline_numpy_pos_per_s": positions / t_ref,
        "ours_pos_per_s_per_layer": positions / t_ours,
        "speedup": t_ref / t_ours,
        "mismatches": mismatches,
        "ids_compared": int(ref.size),  # every row id of the layer: the mismatch count covers them all
        "distinct_ids": int(np.unique(ours).size),
        "target_pos_per_s": 10e6,
    }
    print(f"hasher: {positions:,} positions, N=3, K=8 ({h.heads_per_layer} row ids/position), V'={V}, "
          "1 thread")
    print(f"  baseline (reference numpy): {res['baseline_numpy_pos_per_s'] / 1e6:8.1f} M positions/s/layer")
    print(f"  ours (uint64, libdivide)  : {res['ours_pos_per_s_per_layer'] / 1e6:8.1f} M positions/s/layer "
          f"({res['speedup']:.2f}x), mismatches vs baseline: {mismatches}")
    json_line(res)
    return res


if __name__ == "__main__":
    main()
