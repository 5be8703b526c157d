"""Byte-level BPE tokenizer trained offline on real text (default: the Python stdlib source).

Engram's tables are addressed by token n-grams, so the model, its tables and the store
built from them are only meaningful together with the exact tokenizer they were trained
with. We therefore train our own small vocabulary (8K-16K; a 128K vocabulary would make
the tables of a CPU-sized model mostly empty) and ship it as ``tokenizer.json`` (the
HuggingFace ``tokenizers`` format) inside every checkpoint and store.

Training is deterministic for a given file list, size cap and vocabulary size: files
are read in sorted order of their path relative to the text root.

CLI: ``python -m engram_model.tokenizer --out tok.json [--vocab-size 8192] [--text ...]``
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engram_model.errors import EngramConfigError

__all__ = [
    "EOT_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "stdlib_text_files",
    "iter_texts",
    "train_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
]

EOT_TOKEN = "<|endoftext|>"  # separates documents (files) in the token stream; raw id 0
PAD_TOKEN = "<|pad|>"  # fills n-gram positions before the sequence start; raw id 1
SPECIAL_TOKENS = (EOT_TOKEN, PAD_TOKEN)


def stdlib_text_files(root: str | Path | None = None) -> list[Path]:
    """All ``*.py`` files of the Python standard library, in a deterministic order.

    ``site-packages`` is skipped: it differs between machines, the stdlib does not.
    """
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise EngramConfigError(f"text root {str(base)!r} is not a directory; pass --text FILES")
    files = [p for p in base.rglob("*.py") if "site-packages" not in p.relative_to(base).parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def iter_texts(files: Sequence[str | Path], max_bytes: int | None = None) -> Iterator[str]:
    """Yield the text of each file (UTF-8, undecodable bytes replaced) until ``max_bytes``.

    The cap counts encoded bytes and truncates the last file, so a given cap always
    yields the same text. Files that cannot be read are an error, not silently skipped:
    a missing file would change the training data without notice.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise EngramConfigError(f"max_bytes must be positive, got {max_bytes}")
    used = 0
    for f in files:
        data = Path(f).read_bytes()
        if max_bytes is not None and used + len(data) > max_bytes:
            data = data[: max_bytes - used]
        used += len(data)
        if data:
            yield data.decode("utf-8", errors="replace")
        if max_bytes is not None and used >= max_bytes:
            return


def train_tokenizer(
    files: Sequence[str | Path] | None = None,
    *,
    vocab_size: int = 8192,
    max_bytes: int | None = 8 << 20,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization) on ``files``.

    Args:
        files: text files; default the stdlib ``*.py`` files (:func:`stdlib_text_files`).
        vocab_size: final vocabulary including the 256 byte tokens and the special tokens.
        max_bytes: cap on the training text; 8 MiB trains in a few seconds on 2 cores and
            gives the same merges for the common tokens as the full 30 MB.
        min_frequency: pairs seen fewer times are not merged.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise EngramConfigError(f"vocab_size={vocab_size} is below the 256 byte tokens + specials; use >= 512")
    files = stdlib_text_files() if files is None else list(files)
    if not files:
        raise EngramConfigError("no text files to train the tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(files, max_bytes), trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write ``tokenizer.json`` (HF tokenizers format); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``; a directory means ``DIR/tokenizer.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise EngramConfigError(f"tokenizer file {str(path)!r} not found")
    return Tokenizer.from_file(str(path))


def _main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output tokenizer.json")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--max-bytes", type=int, default=8 << 20, help="cap on training text (bytes)")
    ap.add_argument("--text", nargs="*", default=None, help="text files (default: stdlib *.py)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    tok = train_tokenizer(args.text, vocab_size=args.vocab_size, max_bytes=args.max_bytes)
    save_tokenizer(tok, args.out)
    print(f"trained vocab {tok.get_vocab_size()} in {time.perf_counter() - t0:.1f}s -> {args.out}")


if __name__ == "__main__":
    _main()
