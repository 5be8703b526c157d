"""`tierstore trace`: text -> the row-access trace of every Engram table, as a server reads them.

    tierstore trace --checkpoint CKPT --stdlib --split test --streams 64 --out test.trace.zst
    tierstore trace --store STORE --text a.txt docs/ --out t.trace.zst
    tierstore trace --checkpoint CKPT --tokens ids.npy --out t.trace.zst
    tierstore trace --tokenizer tokenizer.json --preset deepseek-v4.1 --text docs/ --out v41.trace.zst
    tierstore trace --tokenizer tokenizer.json --config config.json --stdlib --streams 64 --out v41.trace.zst

The tokenizer, the compression map and the hashing config come from the checkpoint
(``config.json`` + ``tokenizer.json``) or from a store's attachments. A DeepSeek-V4.1
trace needs no tables: ``--tokenizer`` (DeepSeek's ``tokenizer.json``) with the model's
``--config config.json`` or ``--preset deepseek-v4.1`` (the released geometry), and writes
both Engram layers (``layers.{1,14}.engram.embed.weight``); a checkpoint or store whose
``config.json`` is V4.1's (``text_config.engram_*``) is read the same way. Each document is
tokenized, compressed and hashed on its own (its n-grams start from the pad id), and the
documents are served by ``--streams`` B sequences at once as continuous batching does: a
stream takes the next document when its current one ends, and each step reads one token
of every active stream, 16 lookups per token per table (N-1 orders x K heads). The trace
records those row ids in order and where each step starts.

``--doc-tokens N`` cuts documents into requests of at most N tokens (each is hashed as a
sequence of its own), so a token budget yields enough requests to keep B streams busy.
``--split train|test`` keeps every other document (``--split-every``), so a profile taken
from the train slice never peeks at the test slice.

The store's CLI knows nothing of tokenizers: this module adds ``trace`` to it through the
``tierstore.commands`` entry point (pyproject.toml), which ``tierstore_cli.cli`` discovers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from tierstore import TableTrace, TierStoreError, Trace, distinct, save_trace

__all__ = ["add_parser", "run", "interleave", "TraceSource"]


class TraceSource:
    """Tokenizer + compression + hasher of a model, read from a checkpoint, a store, or a
    DeepSeek-V4.1 ``tokenizer.json`` with its ``config.json`` or preset (no tables needed)."""

    def __init__(self, *, checkpoint: str | None = None, store: str | None = None, tokenizer: str | None = None,
                 config: str | None = None, preset: str | None = None):
        from engram_model.checkpoint import read_config
        from engram_model.compression import build_compression
        from engram_model.hasher import NgramHasher
        from engram_model.model import ENGRAM_TABLE, table_name
        from engram_model.tokenizer import load_tokenizer

        if sum(x is not None for x in (checkpoint, store, tokenizer)) != 1:
            raise TierStoreError("pass exactly one of --checkpoint CKPT, --store STORE or --tokenizer tokenizer.json "
                                 "(with --config config.json or --preset deepseek-v4.1)")
        if tokenizer is None and (config is not None or preset is not None):
            raise TierStoreError("--config and --preset go with --tokenizer; a checkpoint or store has its own config")
        if tokenizer is not None:
            if (config is None) == (preset is None):
                raise TierStoreError("--tokenizer needs the model's geometry: --config config.json "
                                     "or --preset deepseek-v4.1 (one of them)")
            self._v41(load_tokenizer(tokenizer), config=config, preset=preset)
            return
        if checkpoint is not None:
            cfg_path, tok_path = Path(checkpoint) / "config.json", Path(checkpoint) / "tokenizer.json"
        else:
            att = Path(store) / "attachments"
            cfg_path, tok_path = att / "config.json", att / "tokenizer.json"
        for p in (cfg_path, tok_path):
            if not p.is_file():
                raise TierStoreError(
                    f"{str(p)!r} not found: a trace needs the model's config.json and tokenizer.json "
                    "(a checkpoint directory, or a store built with them attached)")
        if _is_v41_config(cfg_path):
            self._v41(load_tokenizer(tok_path), config=str(cfg_path))
            return
        self.config = read_config(cfg_path)
        if "hasher" not in self.config:
            raise TierStoreError(f"{str(cfg_path)!r} describes a model without Engram layers")
        self.tokenizer = load_tokenizer(tok_path)
        self.compression = build_compression(self.tokenizer)
        want = self.config.get("compressed_vocab_size")
        if want is not None and want != self.compression.num_compressed:
            raise TierStoreError(
                f"tokenizer compresses to {self.compression.num_compressed} ids, the model expects {want}: "
                "wrong tokenizer.json for this model")
        self.hasher = NgramHasher(**self.config["hasher"])
        pattern = self.config.get("model", {}).get("engram_table", ENGRAM_TABLE)
        self.tables = {table_name(L, pattern): L for L in self.hasher.layer_ids}

    def _v41(self, tok: object, *, config: str | None = None, preset: str | None = None) -> None:
        """DeepSeek-V4.1's addressing (engram_model.deepseek_v41), hashed with the config's V'
        even when the tokenizer lacks the model's last added tokens (its public one does)."""
        from engram_model.compression import build_compression
        from engram_model.deepseek_v41 import V41EngramConfig, v41_hasher

        cfg = V41EngramConfig.from_json(config) if config is not None else V41EngramConfig.preset(str(preset))
        self.tokenizer = tok
        self.compression = build_compression(tok)
        self.hasher = v41_hasher(cfg, self.compression, partial_tokenizer=True)
        self.config = {"v41": {
            "engram_layer_ids": list(cfg.engram_layer_ids), "engram_num_embeddings": list(cfg.engram_num_embeddings),
            "engram_compressed_vocab_size": cfg.engram_compressed_vocab_size, "preset": preset,
            "tokenizer_compressed_ids": self.compression.num_compressed,
            # a stored row: head_dim fp8 values + one UE8M0 scale byte per 32 (264 B for V4.1)
            "row_bytes": cfg.engram_head_dim + cfg.engram_head_dim // 32}}
        self.tables = {cfg.table_name(L): L for L in cfg.engram_layer_ids}

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Compressed token ids of each text (empty texts dropped)."""
        encs = self.tokenizer.encode_batch(texts)
        out = []
        for e in encs:
            if e.ids:
                out.append(self.compression(np.asarray(e.ids, dtype=np.int64)))
        return out

    def rows(self, doc: np.ndarray) -> dict[str, np.ndarray]:
        """Packed-table row ids (T, H) of one document for every Engram table: int32 when the
        table has fewer than 2**31 rows (V4.1's 384M do), half the memory of a 10M-token trace."""
        per_layer = self.hasher.hash(doc[None, :])
        out = {}
        for name, L in self.tables.items():
            r = per_layer[L][0] + self.hasher.head_offsets(L)
            out[name] = r.astype(np.int32) if self.hasher.total_rows(L) < 2**31 else r
        return out


def _is_v41_config(path: Path) -> bool:
    """A DeepSeek-V4.1 config.json (Engram fields under ``text_config``), not ours."""
    import json

    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # read_config reports it
    return isinstance(cfg, dict) and isinstance(cfg.get("text_config"), dict) \
        and "engram_layer_ids" in cfg["text_config"]


def interleave(docs: list[np.ndarray], streams: int) -> tuple[np.ndarray, np.ndarray]:
    """Serve ``docs`` (each (T_i, H) row ids) with ``streams`` sequences at once.

    Continuous batching: each document goes to the stream that frees up first; step t reads
    token t of every stream still running, stream by stream, all H heads of a token in a
    row. Returns (row ids in that order, start of each step). Vectorized: one lexsort.
    """
    if streams < 1:
        raise TierStoreError(f"--streams {streams} must be >= 1")
    if not docs:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    H = docs[0].shape[1]
    lengths = np.array([d.shape[0] for d in docs], dtype=np.int64)
    ends = np.zeros(streams, dtype=np.int64)
    start_step = np.empty(len(docs), dtype=np.int64)
    stream_of = np.empty(len(docs), dtype=np.int64)
    for i, n in enumerate(lengths):  # per document, not per token
        s = int(np.argmin(ends))
        stream_of[i], start_step[i] = s, ends[s]
        ends[s] += n
    tok = np.concatenate(docs)  # (sum T, H)
    doc_of = np.repeat(np.arange(len(docs)), lengths)
    pos = np.arange(tok.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    step = start_step[doc_of] + pos
    order = np.lexsort((stream_of[doc_of], step))
    rows = tok[order].reshape(-1)
    st = step[order]
    first = np.flatnonzero(np.r_[True, st[1:] != st[:-1]])
    return rows, first * H


def _text_files(paths: list[str], stdlib: bool, pattern: str) -> list[Path]:
    from engram_model.tokenizer import stdlib_text_files

    files: list[Path] = stdlib_text_files() if stdlib else []
    for p in paths:
        q = Path(p)
        if q.is_dir():
            files += sorted(f for pat in pattern.split(",") for f in q.rglob(pat) if f.is_file())
        elif q.is_file():
            files.append(q)
        else:
            raise TierStoreError(f"text path {p!r} does not exist")
    return files


def _token_docs(path: str) -> list[np.ndarray]:
    arr = np.load(path, allow_pickle=False)
    if arr.dtype.kind not in "iu" or arr.ndim not in (1, 2):
        raise TierStoreError(f"{path!r}: token ids must be a 1-D (one document) or 2-D (B, T) integer array")
    return [a for a in (arr[None] if arr.ndim == 1 else arr)]


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    src = TraceSource(checkpoint=args.checkpoint, store=args.store, tokenizer=args.tokenizer, config=args.config,
                      preset=args.preset)
    if args.tokens:
        raw_docs = _token_docs(args.tokens)
        vocab = src.compression.vocab_size
        for d in raw_docs:
            if d.size and (d.min() < 0 or d.max() >= vocab):
                raise TierStoreError(f"{args.tokens!r}: token ids must lie in [0, {vocab}) for this tokenizer")
        docs = [src.compression(d.astype(np.int64)) for d in raw_docs if d.size]
    else:
        files = _text_files(args.text or [], args.stdlib or not args.text, args.glob)
        if args.split != "all":
            k = args.split_every
            files = [f for i, f in enumerate(files) if (i % k == 0) == (args.split == "train")]
        if not files:
            raise TierStoreError("no text to trace: pass --text FILES/DIRS or --stdlib")
        docs, n_tok = [], 0
        chunk = 256
        for i in range(0, len(files), chunk):  # tokenizers encodes a batch on all cores
            texts = [f.read_bytes().decode("utf-8", errors="replace") for f in files[i:i + chunk]]
            for d in src.encode(texts):
                if args.max_tokens and n_tok + d.size > args.max_tokens:
                    d = d[: args.max_tokens - n_tok]
                if d.size:
                    docs.append(d)
                    n_tok += d.size
                if args.max_tokens and n_tok >= args.max_tokens:
                    break
            if args.max_tokens and n_tok >= args.max_tokens:
                break
    if not docs:
        raise TierStoreError("the input holds no tokens")
    if args.doc_tokens > 0:  # a server's requests are bounded: cut long documents into several
        docs = [d[i:i + args.doc_tokens] for d in docs for i in range(0, d.size, args.doc_tokens)]
    per_table: dict[str, list[np.ndarray]] = {name: [] for name in src.tables}
    for d in docs:
        for name, r in src.rows(d).items():
            per_table[name].append(r)
    tables = {}
    for name, rows in per_table.items():
        flat, offsets = interleave(rows, args.streams)
        L = src.tables[name]
        tables[name] = TableTrace(flat, offsets, src.hasher.total_rows(L))
    n_tokens = int(sum(d.size for d in docs))
    meta = {"streams": args.streams, "documents": len(docs), "tokens": n_tokens,
            "doc_tokens": args.doc_tokens,
            "lookups_per_token": src.hasher.heads_per_layer, "split": args.split,
            "split_every": args.split_every, "source": "tokens" if args.tokens else "text"}
    if "v41" in src.config:  # the geometry, and the stored row size `tierstore profile/size` budgets with
        meta["model"] = src.config["v41"]
        meta["row_bytes"] = src.config["v41"]["row_bytes"]
    save_trace(args.out, Trace(tables, meta))
    dt = time.perf_counter() - t0
    for name, t in tables.items():
        print(f"{name}: {t.rows.size:,} lookups in {t.offsets.size:,} steps, "
              f"{distinct(t.rows).size:,} distinct of {t.n_rows:,} rows")
    print(f"traced {len(docs):,} documents, {n_tokens:,} tokens, {args.streams} streams "
          f"in {dt:.1f} s -> {args.out}", file=sys.stderr)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("trace", help="text -> row-access trace of each Engram table",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="model checkpoint directory (config.json, tokenizer.json)")
    src.add_argument("--store", help="store built with the model's config.json and tokenizer.json attached")
    src.add_argument("--tokenizer", help="DeepSeek-V4.1's tokenizer.json (with --config or --preset): no tables needed")
    geo = p.add_mutually_exclusive_group()
    geo.add_argument("--config", help="with --tokenizer: the V4.1 config.json (text_config.engram_*)")
    geo.add_argument("--preset",
                     help="with --tokenizer: the released V4.1 geometry (layers 1 and 14, 384M rows each)")
    p.add_argument("--text", nargs="*", default=None, help="text files or directories (see --glob)")
    p.add_argument("--glob", default="*.py,*.txt,*.md", help="file patterns inside --text directories")
    p.add_argument("--stdlib", action="store_true", help="the Python standard library's *.py (default text)")
    p.add_argument("--tokens", default=None, help=".npy of raw token ids: 1-D one document, 2-D (B, T)")
    p.add_argument("--split", choices=("all", "train", "test"), default="all",
                   help="keep every other document: train = even, test = odd (see --split-every)")
    p.add_argument("--split-every", type=int, default=2, help="train keeps documents i %% k == 0")
    p.add_argument("--max-tokens", type=int, default=0, help="stop after this many tokens (0: all)")
    p.add_argument("--streams", type=int, default=1, help="sequences served at once (interleaved)")
    p.add_argument("--doc-tokens", type=int, default=0,
                   help="cut documents into requests of at most this many tokens (0: whole documents)")
    p.add_argument("--out", required=True, help="output trace file (.trace.zst)")
    p.set_defaults(func=run)
