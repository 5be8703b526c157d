"""A DeepSeek-V4.1-Flash-layout checkpoint made here, and an independent reader of its Engram rows.

The released model's Engram tables are too large for this machine (two tables of ~384M
rows, ~189 GiB), so the benchmark writes a miniature in exactly the released layout
(docs/deepseek_v41.md, "What the release holds"):

* ``config.json``: the Engram keys under ``text_config`` (``engram_layer_ids`` [1, 14],
  ``engram_max_ngram_size`` 4, ``engram_n_heads`` 8, ``engram_head_dim`` 256,
  ``engram_vocab_size``, ``engram_num_embeddings`` (the rows of each layer's table, from
  the hasher's primes), ``engram_compressed_vocab_size``, ``engram_pad_token_id``) and
  ``quantization_config`` fp8 / e4m3 / ``scale_fmt`` ue8m0;
* sharded safetensors ``model-0000k-of-0000n.safetensors`` with
  ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``); the dense
  tensors in the first shard, each Engram layer's ``layers.{L}.engram.embed.weight``
  (F8_E4M3 [rows, 256]) and ``layers.{L}.engram.embed.scale`` (F8_E8M0 [rows, 8], one
  power-of-two scale per 32 values) in a shard of its own, the last ones.

What differs from the release, and why it does not matter to the store: the tables are
smaller (``engram_vocab_size`` is picked so the two total about ``--table-gib``); the values
come from a seeded counter-based generator (random fp8 codes with exponents 0..7, so
|value| <= 1.875 and never NaN; scales 2^-2..2^0), not training; the dense part is a small
random model (the caller's tensors), not the released backbone; the tokenizer is ours
(so ``engram_compressed_vocab_size`` and ``engram_pad_token_id`` are our tokenizer's). The store reads only the two Engram tensors.

Written in bounded memory: a table is generated and written ``CHUNK_ROWS`` rows at a time
(64 MiB of codes in one reused buffer), and each shard is flushed and dropped from
the page cache every ``_FLUSH_BYTES``, so writing 30 GiB neither holds it in memory nor
fills the machine's page cache with it.

The reference reader (:func:`reference_rows`) shares no code with the store or with the
benchmark's memory-mapped baseline: it parses the index and the safetensors headers
itself, reads each row with ``os.pread`` and decodes fp8 e4m3 and e8m0 from their bit
fields in numpy. Rows come back as the bf16 bit patterns of value x 2^(scale - 127), which
are exact (a 4-bit-significand fp8 value times a power of two fits bf16's 8 bits).

    python -m benchmarks.v41_checkpoint --out DIR --engram-vocab-size 2542000 \\
        --compressed-vocab-size 13000 --pad-id 1 [--seed 0] [--dense FILE.safetensors]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engram_model.hasher import NgramHasher
from tierstore.jit import kernel

__all__ = [
    "LAYER_IDS", "MAX_NGRAM", "N_HEADS", "HEAD_DIM", "SCALE_BLOCK", "ROW_BYTES",
    "table_rows", "vocab_for_table_bytes", "text_config", "write_checkpoint",
    "EngramTensors", "engram_tensors", "decode_e4m3", "decode_e8m0", "reference_rows", "main",
]

# The released model's Engram shape: layers [1, 14], 2..4-grams, 8 heads of 256 values.
LAYER_IDS = (1, 14)
MAX_NGRAM = 4
N_HEADS = 8
HEAD_DIM = 256
SCALE_BLOCK = 32  # values per ue8m0 scale
ROW_BYTES = HEAD_DIM + HEAD_DIM // SCALE_BLOCK  # 256 fp8 codes + 8 scales = 264 bytes per row
CHUNK_ROWS = 1 << 18  # rows generated and written per step: 64 MiB of codes
_FLUSH_BYTES = 1 << 30  # fdatasync + drop the written pages this often
_SCALE_EXPONENTS = (127 - 2, 127)  # ue8m0 biased exponents drawn per 32 values: 2^-2 .. 2^0
# fp8 codes are random bytes with bit 6 (the exponent's top bit) cleared: exponents 0..7, so
# |value| <= 1.875 with subnormals, and never the NaN codes 0x7F / 0xFF
_CODE_MASK = np.uint64(0xBFBFBFBFBFBFBFBF)


def _hasher(engram_vocab_size: int, compressed_vocab_size: int, pad_id: int) -> NgramHasher:
    """The released hashing (as ``engram_model.deepseek_v41.v41_hasher``, which needs the table
    sizes this computes): base size ``engram_vocab_size`` for each of the orders 2..4, 8
    heads, layers [1, 14], multipliers from ``default_rng(10007 * layer)``."""
    return NgramHasher(compressed_vocab_size, MAX_NGRAM, N_HEADS, base_sizes=[engram_vocab_size] * (MAX_NGRAM - 1),
                       layer_ids=LAYER_IDS, pad_id=pad_id, seed=0)


def table_rows(engram_vocab_size: int, compressed_vocab_size: int = 2, pad_id: int = 0) -> dict[int, int]:
    """Rows of each layer's table (``engram_num_embeddings``): the sum of its 24 primes.
    The primes depend only on ``engram_vocab_size`` (the compressed vocabulary sets the
    multipliers, not the sizes)."""
    h = _hasher(engram_vocab_size, compressed_vocab_size, pad_id)
    return {L: h.total_rows(L) for L in LAYER_IDS}


def vocab_for_table_bytes(target: int) -> int:
    """The smallest round ``engram_vocab_size`` whose two tables (264-byte rows) hold at least
    ``target`` bytes: 2 layers x 24 heads x a prime just above the base size."""
    heads = len(LAYER_IDS) * (MAX_NGRAM - 1) * N_HEADS
    v = max(16, -(-target // (heads * ROW_BYTES)))
    while sum(table_rows(v).values()) * ROW_BYTES < target:  # primes above v: rarely needed
        v += max(1, v // 1000)
    return v


def text_config(engram_vocab_size: int, compressed_vocab_size: int, pad_id: int, *,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Engram keys of the release's ``text_config`` for a miniature of this size."""
    rows = table_rows(engram_vocab_size, compressed_vocab_size, pad_id)
    cfg: dict[str, Any] = {
        "engram_layer_ids": list(LAYER_IDS),
        "engram_max_ngram_size": MAX_NGRAM,
        "engram_n_heads": N_HEADS,
        "engram_head_dim": HEAD_DIM,
        "engram_vocab_size": int(engram_vocab_size),
        "engram_num_embeddings": [rows[L] for L in LAYER_IDS],
        "engram_compressed_vocab_size": int(compressed_vocab_size),
        "engram_pad_token_id": int(pad_id),
    }
    cfg.update(extra or {})
    return cfg


# --------------------------------------------------------------------------- the values
def decode_e4m3() -> np.ndarray:
    """float64 value of each of the 256 fp8 e4m3fn codes (NaN for 0x7F and 0xFF), from the bit
    fields: sign, 4 exponent bits (bias 7; 0 means subnormal), 3 mantissa bits; no infinities."""
    code = np.arange(256)
    sign = np.where(code & 0x80, -1.0, 1.0)
    exp, man = (code >> 3) & 0xF, code & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = sign * val
    val[(exp == 15) & (man == 7)] = np.nan
    return val


def decode_e8m0() -> np.ndarray:
    """float64 value of each ue8m0 code: 2^(code - 127), NaN for 0xFF."""
    val = 2.0 ** (np.arange(256, dtype=np.float64) - 127)
    val[255] = np.nan
    return val


@kernel
def _fill_random(out: np.ndarray, seed: np.uint64, counter: np.uint64, mask: np.uint64) -> None:
    """Fill ``out`` (uint8, a multiple of 8 bytes) with splitmix64 of (seed, counter + i), ANDed
    with ``mask``: a seeded counter-based generator (any chunk can be made on its own), ~4 GB/s
    here where numpy's generators give 0.1-0.2 GB/s (a 30 GiB table would take minutes)."""
    o = out.view(np.uint64)
    for i in range(o.size):
        z = seed + (counter + np.uint64(i)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        o[i] = (z ^ (z >> np.uint64(31))) & mask


# --------------------------------------------------------------------------- writing
def _safetensors_header(entries: Sequence[tuple[str, str, Sequence[int], int]]) -> tuple[bytes, list[int]]:
    """(8-byte length + JSON header padded to 8, data offset of each tensor) for (name, dtype, shape, nbytes)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets, pos = [], 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class _Writer:
    """Sequential writes into one shard that keep neither dirty nor clean pages around."""

    def __init__(self, path: Path):
        self.path, self.fd, self.pos, self.flushed = path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 0, 0

    def write(self, data: bytes | memoryview | np.ndarray) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self.fd, view)
            view, self.pos = view[n:], self.pos + n
        if self.pos - self.flushed >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        os.fdatasync(self.fd)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written pages are clean now: drop them
        self.flushed = self.pos

    def close(self) -> None:
        self.flush()
        os.close(self.fd)


def _write_engram_shard(path: Path, layer: int, rows: int, seed: int) -> dict[str, int]:
    """One layer's weight and scale tensors, generated and written ``CHUNK_ROWS`` rows at a time."""
    wname, sname = f"layers.{layer}.engram.embed.weight", f"layers.{layer}.engram.embed.scale"
    n_scales = HEAD_DIM // SCALE_BLOCK
    head, _ = _safetensors_header([(wname, "F8_E4M3", (rows, HEAD_DIM), rows * HEAD_DIM),
                                   (sname, "F8_E8M0", (rows, n_scales), rows * n_scales)])
    buf = np.empty(CHUNK_ROWS * HEAD_DIM, dtype=np.uint8)
    key = np.uint64((seed * 1_000_003 + layer) & 0xFFFFFFFFFFFFFFFF)
    w = _Writer(path)
    try:
        w.write(head)
        for start in range(0, rows, CHUNK_ROWS):  # codes: row r's bytes are words of counter r * 32 ...
            n = min(CHUNK_ROWS, rows - start)
            _fill_random(buf[: n * HEAD_DIM], key, np.uint64(start * HEAD_DIM // 8), _CODE_MASK)
            w.write(buf[: n * HEAD_DIM])
        lo, hi = _SCALE_EXPONENTS
        for start in range(0, rows, CHUNK_ROWS):  # ... scales: counters after every code word
            n = min(CHUNK_ROWS, rows - start)
            sc = buf[: n * n_scales]
            _fill_random(sc, key, np.uint64((rows * HEAD_DIM + start * n_scales) // 8), np.uint64(2**64 - 1))
            np.remainder(sc, hi - lo + 1, out=sc)
            np.add(sc, lo, out=sc)
            w.write(sc)
    finally:
        w.close()
    return {wname: rows * HEAD_DIM, sname: rows * n_scales}


def _write_dense_shard(path: Path, dense: Mapping[str, np.ndarray]) -> dict[str, int]:
    tags = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
            np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8"}
    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(dense.items())}
    entries = [(k, tags[a.dtype], a.shape, a.nbytes) for k, a in arrays.items()]
    head, _ = _safetensors_header(entries)
    w = _Writer(path)
    try:
        w.write(head)
        for a in arrays.values():
            w.write(a.reshape(-1).view(np.uint8))
    finally:
        w.close()
    return {k: a.nbytes for k, a in arrays.items()}


def write_checkpoint(out: str | os.PathLike[str], *, engram_vocab_size: int, compressed_vocab_size: int,
                     pad_id: int, dense: Mapping[str, np.ndarray], seed: int = 0,
                     config_extra: Mapping[str, Any] | None = None,
                     text_config_extra: Mapping[str, Any] | None = None) -> Path:
    """Write the miniature into ``out`` (created): config.json, the shards, the index.

    dense: the non-Engram tensors (numpy), written into the first shard.
    config_extra: more top-level config.json keys (e.g. how to rebuild the dense model);
    text_config_extra: more ``text_config`` keys (vocab_size, num_hidden_layers, ...).
    Returns ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(engram_vocab_size, compressed_vocab_size, pad_id)
    n = 1 + len(LAYER_IDS)
    names = [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    weight_map: dict[str, str] = {}
    sizes = _write_dense_shard(out / names[0], dense)
    weight_map.update({k: names[0] for k in sizes})
    for shard, L in zip(names[1:], LAYER_IDS):  # the tables in the last shards, as released
        got = _write_engram_shard(out / shard, L, rows[L], seed)
        sizes.update(got)
        weight_map.update({k: shard for k in got})
    index = {"metadata": {"total_size": int(sum(sizes.values()))}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {
        "architectures": ["DeepseekV41ForCausalLM"],
        "model_type": "deepseek_v41",
        "text_config": text_config(engram_vocab_size, compressed_vocab_size, pad_id, extra=text_config_extra),
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
        **(config_extra or {}),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------- reading (reference)
@dataclass(frozen=True)
class EngramTensors:
    """Where one layer's Engram rows are: the shard files and the byte offsets of both tensors."""

    layer: int
    rows: int
    weight_file: Path
    weight_offset: int  # byte offset of row 0's 256 codes in weight_file
    scale_file: Path
    scale_offset: int  # byte offset of row 0's 8 scales in scale_file


def _tensor_offsets(path: Path) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype tag, shape, absolute byte offset) from a safetensors header."""
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], 8 + hlen + v["data_offsets"][0]) for k, v in header.items()}


def engram_tensors(ckpt: str | os.PathLike[str]) -> dict[int, EngramTensors]:
    """Every Engram layer of a V4.1-layout checkpoint directory, by layer id."""
    root = Path(ckpt)
    weight_map = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, shard in weight_map.items():
        if not name.endswith(".engram.embed.weight"):
            continue
        layer = int(name.split(".")[1])
        sname = name[: -len("weight")] + "scale"
        wt, wshape, woff = _tensor_offsets(root / shard)[name]
        st, sshape, soff = _tensor_offsets(root / weight_map[sname])[sname]
        if (wt, st) != ("F8_E4M3", "F8_E8M0") or wshape != [wshape[0], HEAD_DIM] or sshape != [wshape[0], HEAD_DIM // SCALE_BLOCK]:
            raise ValueError(f"{name}: {wt} {wshape} with {st} {sshape} is not the released Engram layout")
        out[layer] = EngramTensors(layer, wshape[0], root / shard, woff, root / weight_map[sname], soff)
    return dict(sorted(out.items()))


def reference_rows(t: EngramTensors, ids: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16, (len(ids), 256)) of rows ``ids``, read and dequantized here alone.

    Not a hot path (a correctness oracle): one ``pread`` of codes and one of scales per row.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= t.rows):
        raise IndexError(f"row ids must be in [0, {t.rows}), got [{ids.min()}, {ids.max()}]")
    nsc = HEAD_DIM // SCALE_BLOCK
    codes = np.empty((len(ids), HEAD_DIM), dtype=np.uint8)
    scales = np.empty((len(ids), nsc), dtype=np.uint8)
    wfd, sfd = os.open(t.weight_file, os.O_RDONLY), os.open(t.scale_file, os.O_RDONLY)
    try:
        for i, r in enumerate(ids.tolist()):
            codes[i] = np.frombuffer(os.pread(wfd, HEAD_DIM, t.weight_offset + r * HEAD_DIM), dtype=np.uint8)
            scales[i] = np.frombuffer(os.pread(sfd, nsc, t.scale_offset + r * nsc), dtype=np.uint8)
    finally:
        os.close(wfd)
        os.close(sfd)
    values = decode_e4m3()[codes] * np.repeat(decode_e8m0()[scales], SCALE_BLOCK, axis=1)  # exact in float64
    bits = values.astype(np.float32).view(np.uint32)
    if np.any(bits & 0xFFFF):
        raise ValueError("a dequantized value does not fit bf16 exactly: not an e4m3 x e8m0 product")
    return (bits >> 16).astype(np.uint16)


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="Write a DeepSeek-V4.1-layout miniature checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--engram-vocab-size", type=int, required=True, help="per-head base size (primes start here)")
    ap.add_argument("--compressed-vocab-size", type=int, required=True)
    ap.add_argument("--pad-id", type=int, default=0, help="raw id of the pad token")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense", default=None, help="safetensors file of the dense tensors (default: none)")
    ap.add_argument("--config-extra", default=None, help="JSON file of more config.json keys")
    ap.add_argument("--text-config-extra", default=None, help="JSON file of more text_config keys")
    args = ap.parse_args(argv)
    dense: dict[str, np.ndarray] = {}
    if args.dense:
        from safetensors.numpy import load_file

        dense = load_file(args.dense)
    load = lambda p: json.loads(Path(p).read_text()) if p else None  # noqa: E731
    t0 = time.perf_counter()
    out = write_checkpoint(args.out, engram_vocab_size=args.engram_vocab_size,
                           compressed_vocab_size=args.compressed_vocab_size, pad_id=args.pad_id, dense=dense,
                           seed=args.seed, config_extra=load(args.config_extra),
                           text_config_extra=load(args.text_config_extra))
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    res = {"out": str(out), "bytes": total, "seconds": time.perf_counter() - t0}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
