"""Tokenizer compression: a surjective map raw token id -> compressed id (docs/engram.md, step 1).

Tokens whose text differs only in case, accents, Unicode compatibility form or
surrounding whitespace get one compressed id, so their n-grams share table rows. The map
reproduces the public reference demo exactly:

* decode each token alone; if the text holds U+FFFD (a byte-level token that is a partial
  UTF-8 sequence) its key is the raw token string, so it keeps its own id;
* otherwise key = NFKC -> NFD -> strip accents -> lowercase -> collapse runs of
  [ \\t\\r\\n] to one space -> strip, except that a token that is only whitespace stays a
  single space; if that leaves nothing (e.g. a lone combining accent) the key is the
  original text;
* compressed ids are handed out in order of first appearance over raw ids 0..V-1.

The map is a pure function of the tokenizer. Checkpoints store it all the same (the
model's ``compress`` buffer in model.safetensors, a few KB), so the weights are
self-contained; on load it is also rebuilt from tokenizer.json (a few hundred ms for 16K
tokens) and must equal the stored one, which catches the wrong tokenizer
(engram_model/checkpoint.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, normalizers

from engram_model.errors import IdTypeError, InvalidIdError

__all__ = ["CompressionMap", "build_compression", "normalizer"]

_SENTINEL = "\ue000"  # private-use char that protects a lone space from Strip()


def normalizer() -> normalizers.Normalizer:
    """The text normalizer of step 1 (docs/engram.md), identical to the reference demo's."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


@dataclass(frozen=True)
class CompressionMap:
    """``lookup[raw_id] -> compressed id``; ``num_compressed`` is the compressed vocabulary V'."""

    lookup: np.ndarray  # int64 (V,)
    num_compressed: int

    @property
    def vocab_size(self) -> int:
        """Raw vocabulary size V."""
        return int(self.lookup.shape[0])

    @property
    def reduction(self) -> float:
        """Fraction of ids removed: 1 - V'/V (paper: ~0.23 on a 128K vocabulary)."""
        return 1.0 - self.num_compressed / self.vocab_size

    def __call__(self, ids: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Compress an id array of any shape (one gather; returns the input's type).

        Raises InvalidIdError for ids outside [0, V) and IdTypeError for non-integers.
        Cost: one min/max pass plus one gather, ~1 ns per id.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise IdTypeError(f"token ids must be integers, got {ids.dtype}")
            out = self(ids.detach().cpu().numpy())
            return torch.from_numpy(out)  # type: ignore[arg-type]
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise IdTypeError(f"token ids must be integers, got {arr.dtype}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size):
            raise InvalidIdError(
                f"token ids must be in [0, {self.vocab_size}), got range "
                f"[{int(arr.min())}, {int(arr.max())}]; was the text encoded with another tokenizer?"
            )
        return self.lookup[arr]


def build_compression(tok: Tokenizer) -> CompressionMap:
    """Build the compressed-id map of ``tok`` (build time only: a Python loop over the vocab)."""
    norm = normalizer()
    V = tok.get_vocab_size(with_added_tokens=True)
    texts = tok.decode_batch([[i] for i in range(V)], skip_special_tokens=False)
    key_to_cid: dict[str, int] = {}
    lookup = np.empty(V, dtype=np.int64)
    for tid, text in enumerate(texts):
        if "\ufffd" in text:
            key = tok.id_to_token(tid)
        else:
            normed = norm.normalize_str(text)
            key = normed if normed else text
        lookup[tid] = key_to_cid.setdefault(key, len(key_to_cid))
    return CompressionMap(lookup=lookup, num_compressed=len(key_to_cid))
