"""Training text as token streams: a deterministic file split and seeded random windows.

Every file is encoded on its own and followed by the end-of-text token. Files are split
into train / validation by position in the sorted list (every ``val_every``-th file is
held out), so validation text is never seen in training and the split is the same on
every machine with the same Python. Batches are windows at positions drawn from a seeded
generator: two runs with the same seed, batch and sequence length train on exactly the
same tokens, whatever the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from engram_model.errors import EngramConfigError
from engram_model.tokenizer import EOT_TOKEN, iter_texts

__all__ = ["TokenData", "split_files", "encode_files"]


def split_files(files: Sequence[Path], val_every: int = 20) -> tuple[list[Path], list[Path]]:
    """(train, validation): file i is validation when i % val_every == val_every // 2."""
    if val_every < 2:
        raise EngramConfigError(f"val_every must be >= 2, got {val_every}")
    train = [f for i, f in enumerate(files) if i % val_every != val_every // 2]
    val = [f for i, f in enumerate(files) if i % val_every == val_every // 2]
    if not val:
        raise EngramConfigError(f"only {len(files)} text files: none held out for validation; pass more --text files")
    return train, val


def encode_files(tok: Tokenizer, files: Sequence[Path], max_bytes: int | None = None) -> np.ndarray:
    """Token ids of the files (each followed by <|endoftext|>), int32, up to ``max_bytes`` of text."""
    eot = tok.token_to_id(EOT_TOKEN)
    texts = list(iter_texts(files, max_bytes))
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):  # Rust, parallel
        parts.append(np.asarray(enc.ids, dtype=np.int32))
        parts.append(np.array([eot], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


@dataclass
class TokenData:
    """Train and validation token streams and how batches are cut from them."""

    train: np.ndarray  # int32 token ids
    val: np.ndarray
    seq_len: int
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        for name, arr in (("train", self.train), ("val", self.val)):
            if len(arr) < self.seq_len + 2:
                raise EngramConfigError(f"{name} text has {len(arr)} tokens, fewer than seq_len+2={self.seq_len + 2}")
        self._rng = np.random.default_rng(self.seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Random training windows: inputs (B, T) and next-token targets (B, T), int64."""
        starts = self._rng.integers(0, len(self.train) - self.seq_len - 1, size=self.batch_size)
        return self._windows(self.train, starts)

    def val_batches(self, n_windows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed validation set: ``n_windows`` evenly spaced windows, in batches."""
        last = len(self.val) - self.seq_len - 1
        starts = np.linspace(0, last, num=n_windows).astype(np.int64)
        return [self._windows(self.val, starts[i : i + self.batch_size]) for i in range(0, n_windows, self.batch_size)]

    def _windows(self, arr: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]  # (B, T+1)
        w = torch.from_numpy(arr[idx].astype(np.int64))
        return w[:, :-1], w[:, 1:]
