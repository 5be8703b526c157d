"""Multi-head n-gram hashing: compressed token ids -> Engram table row ids (docs/engram.md, step 3).

Bit-exact with the public reference demo ("The hashing recipe, bit for bit" in docs/engram.md), so that
tables trained there can be served here and vice versa:

* V' = compressed vocabulary size; bound = ((2**63 - 1) // V') // 2 (at least 1).
* per Engram layer L: ``rng = numpy.random.default_rng(seed + 10007 * L)``;
  ``multipliers = 2 * rng.integers(0, bound, size=N, dtype=int64) + 1``.
* table sizes: one running set of used primes over all layers (in the given order), then
  n = 2..N, then the K heads: the smallest unused prime > start, where start is
  base_size[n] - 1 for a layer's first head of an order and the previous prime after.
* x_k[t] = x[t - k] (the pad id before the sequence start);
  mix_n = XOR_{k<n} x_k * m[k] in wrapping int64; row = mix_n mod prime (non-negative).
* output per layer: int64 (B, T, (N-1) * K), n-major then head.

Because every id is below V' and every multiplier below 2 * bound, each product fits in
int64 and mix is non-negative; the arithmetic still wraps like the reference if a caller
passes a larger vocabulary.

Speed: the cost is (N-1) * K remainders per position (16 for N=3, K=8). The reference
takes each with numpy's int64 ``%`` (a hardware division per value, ~2.5 ns) on whole
arrays and stacks 16 of them. Here mix is known to be non-negative, so the remainder is
taken on its uint64 view as mix - (mix // p) * p, where numpy's uint64 division by a
scalar runs libdivide's SIMD multiply-shift; chunks of 16K positions keep the scratch in
cache and results go straight into the output. One thread, no torch intra-op pool (so it
does not degrade when other processes share the cores). See benchmarks/bench_hasher.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engram_model.errors import EngramConfigError, IdTypeError, InvalidIdError

__all__ = ["NgramHasher", "is_prime", "next_unused_prime"]

_LAYER_SEED_STRIDE = 10007  # the reference's PRIME_1
_CHUNK = 16384  # positions per inner step: 3 x 128 KiB of scratch stays in L2


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for n < 3.3e24 (fixed witness set)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_unused_prime(start: int, used: set[int]) -> int:
    """Smallest prime > ``start`` not in ``used`` (the reference's ``find_next_prime``)."""
    c = start + 1
    while not (is_prime(c) and c not in used):
        c += 1
    return c


class NgramHasher:
    """Hash compressed token ids into per-head table rows for every Engram layer.

    Args:
        vocab_size: compressed vocabulary size V' (``CompressionMap.num_compressed``).
        max_ngram_size: N; orders 2..N are hashed (the paper uses 3).
        n_head_per_ngram: K hash heads (independent tables) per order (paper: 8).
        base_sizes: per order n = 2..N, the size each head's table starts from (the
            primes are the next unused ones above it); default 5 * vocab_size, as the demo.
        layer_ids: the model blocks that hold an Engram layer; each gets its own
            multipliers and its own primes (unique across layers).
        pad_id: compressed id used for positions before the sequence start.
        seed: global seed; layer L draws its multipliers from ``seed + 10007 * L``.

    Thread-safety: immutable after construction; ``hash`` may be called concurrently.
    """

    def __init__(
        self,
        vocab_size: int,
        max_ngram_size: int = 3,
        n_head_per_ngram: int = 8,
        base_sizes: Sequence[int] | None = None,
        layer_ids: Sequence[int] = (1,),
        pad_id: int = 0,
        seed: int = 0,
    ) -> None:
        if int(vocab_size) < 1:
            raise EngramConfigError(f"vocab_size must be >= 1, got {vocab_size}")
        if int(max_ngram_size) < 2:
            raise EngramConfigError(f"max_ngram_size must be >= 2 (bigrams and up), got {max_ngram_size}")
        if int(n_head_per_ngram) < 1:
            raise EngramConfigError(f"n_head_per_ngram must be >= 1, got {n_head_per_ngram}")
        n_orders = int(max_ngram_size) - 1
        if base_sizes is None:
            base_sizes = [5 * int(vocab_size)] * n_orders
        base_sizes = [int(b) for b in base_sizes]
        if len(base_sizes) != n_orders:
            raise EngramConfigError(
                f"base_sizes needs one entry per order 2..{max_ngram_size} ({n_orders}), got {len(base_sizes)}"
            )
        if min(base_sizes) < 2:
            raise EngramConfigError(f"base_sizes must be >= 2, got {base_sizes}")
        layer_ids = [int(i) for i in layer_ids]
        if not layer_ids or len(set(layer_ids)) != len(layer_ids) or min(layer_ids) < 0:
            raise EngramConfigError(f"layer_ids must be distinct non-negative ints, got {layer_ids}")
        if not 0 <= int(pad_id) < int(vocab_size):
            raise EngramConfigError(f"pad_id must be a compressed id in [0, {vocab_size}), got {pad_id}")

        self.vocab_size = int(vocab_size)
        self.max_ngram_size = int(max_ngram_size)
        self.n_head_per_ngram = int(n_head_per_ngram)
        self.base_sizes = base_sizes
        self.layer_ids = layer_ids
        self.pad_id = int(pad_id)
        self.seed = int(seed)

        bound = max(1, (np.iinfo(np.int64).max // self.vocab_size) // 2)
        self.multipliers: dict[int, np.ndarray] = {}
        for L in layer_ids:
            rng = np.random.default_rng(self.seed + _LAYER_SEED_STRIDE * L)
            r = rng.integers(0, bound, size=(self.max_ngram_size,), dtype=np.int64)
            self.multipliers[L] = r * 2 + 1

        used: set[int] = set()
        self.table_sizes: dict[int, list[list[int]]] = {}
        for L in layer_ids:
            per_n: list[list[int]] = []
            for base in base_sizes:
                start, heads = base - 1, []
                for _ in range(self.n_head_per_ngram):
                    p = next_unused_prime(start, used)
                    used.add(p)
                    heads.append(p)
                    start = p
                per_n.append(heads)
            self.table_sizes[L] = per_n


    # --- derived sizes -------------------------------------------------------------------
    @property
    def heads_per_layer(self) -> int:
        """(N-1) * K: row lookups per token per Engram layer."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    def head_sizes(self, layer_id: int) -> list[int]:
        """Flat list of the layer's table sizes, in output (n-major, then head) order."""
        return [p for heads in self.table_sizes[layer_id] for p in heads]

    def head_offsets(self, layer_id: int) -> np.ndarray:
        """int64 (H,): where each head's rows start in the layer's packed table."""
        sizes = np.array(self.head_sizes(layer_id), dtype=np.int64)
        return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def total_rows(self, layer_id: int) -> int:
        """Rows of the layer's packed table (sum of its primes)."""
        return int(sum(self.head_sizes(layer_id)))

    # --- hashing -------------------------------------------------------------------------
    def _check_ids(self, ids: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise IdTypeError(f"compressed ids must be integers, got {ids.dtype}")
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise IdTypeError(f"compressed ids must be integers, got {arr.dtype}")
        if arr.ndim != 2:
            raise InvalidIdError(f"compressed ids must be a (B, T) array, got shape {arr.shape}")
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.vocab_size:
                raise InvalidIdError(
                    f"compressed ids must be in [0, {self.vocab_size}), got range [{lo}, {hi}]; "
                    "compress raw token ids with CompressionMap first"
                )
        return np.ascontiguousarray(arr, dtype=np.int64)

    def _hash_layer(self, flat: list[np.ndarray], L: int, out: np.ndarray) -> None:
        """Row ids of layer ``L`` for flattened shifts ``flat[k]`` (P,) into ``out`` (P, H).

        Works in chunks of ``_CHUNK`` positions so that mix and quotient stay in L2.
        Every id is in [0, V') and every multiplier below 2 * bound, so each product fits
        in int64 and mix is non-negative: the remainder can be taken on its uint64 view
        as mix - (mix // p) * p, and numpy divides uint64 by a scalar with libdivide
        (SIMD multiply-shift, ~0.2 ns/value) instead of a hardware division (~2.5 ns).
        """
        P = flat[0].shape[0]
        K = self.n_head_per_ngram
        m = [np.int64(v) for v in self.multipliers[L]]
        primes = [[np.uint64(p) for p in heads] for heads in self.table_sizes[L]]
        outu = out.view(np.uint64)
        c = min(P, _CHUNK)
        mix, tmp, q = np.empty(c, np.int64), np.empty(c, np.int64), np.empty(c, np.uint64)
        for s0 in range(0, P, _CHUNK):
            e = min(P, s0 + _CHUNK)
            mx, tp, qq = mix[: e - s0], tmp[: e - s0], q[: e - s0]
            np.multiply(flat[0][s0:e], m[0], out=mx)
            mu = mx.view(np.uint64)
            for n in range(2, self.max_ngram_size + 1):
                np.multiply(flat[n - 1][s0:e], m[n - 1], out=tp)
                np.bitwise_xor(mx, tp, out=mx)  # mix over x0..x_{n-1}: extends the order n-1 mix
                for j, p in enumerate(primes[n - 2]):
                    np.floor_divide(mu, p, out=qq)
                    np.multiply(qq, p, out=qq)
                    np.subtract(mu, qq, out=outu[s0:e, (n - 2) * K + j])

    def hash(self, compressed_ids: np.ndarray | torch.Tensor) -> dict[int, np.ndarray]:
        """Row ids per Engram layer: ``{layer_id: int64 array (B, T, (N-1)*K)}``.

        ``compressed_ids`` is an integer (B, T) array of compressed ids in [0, vocab_size).
        Row ids index each head's own table (add :meth:`head_offsets` for the packed table).
        """
        x = self._check_ids(compressed_ids)
        B, T = x.shape
        flat = [x.reshape(-1)]
        for k in range(1, self.max_ngram_size):  # x_k[t] = x[t-k], pad before the start
            s = np.full((B, T), self.pad_id, dtype=np.int64)
            if k < T:
                s[:, k:] = x[:, : T - k]
            flat.append(s.reshape(-1))
        result = {}
        for L in self.layer_ids:
            out = np.empty((B * T, self.heads_per_layer), dtype=np.int64)
            if B * T:
                self._hash_layer(flat, L, out)
            result[L] = out.reshape(B, T, self.heads_per_layer)
        return result

    def hash_torch(self, compressed_ids: np.ndarray | torch.Tensor) -> dict[int, torch.Tensor]:
        """Like :meth:`hash` but returns torch int64 tensors (B, T, (N-1)*K) (no copy)."""
        return {L: torch.from_numpy(a) for L, a in self.hash(compressed_ids).items()}

    def config(self) -> dict[str, object]:
        """JSON-able constructor arguments (stored in a checkpoint's config.json)."""
        return {
            "vocab_size": self.vocab_size,
            "max_ngram_size": self.max_ngram_size,
            "n_head_per_ngram": self.n_head_per_ngram,
            "base_sizes": list(self.base_sizes),
            "layer_ids": list(self.layer_ids),
            "pad_id": self.pad_id,
            "seed": self.seed,
        }
