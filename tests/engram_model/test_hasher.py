"""NgramHasher against an independent plain-Python reference of the hashing recipe (docs/engram.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram_model.errors import EngramConfigError, IdTypeError, InvalidIdError
from engram_model.hasher import NgramHasher, is_prime

torch.set_num_threads(2)


def _wrap64(v: int) -> int:
    """Python int -> the int64 value with the same low 64 bits (two's complement wrap)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _naive_is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def reference_hash(ids, V, N, K, base_sizes, layer_ids, pad_id, seed):
    """The recipe written out with Python ints, one position at a time (slow, obvious)."""
    bound = max(1, ((2**63 - 1) // V) // 2)
    used: set[int] = set()
    sizes = {}
    for L in layer_ids:
        per_n = []
        for n in range(2, N + 1):
            start, heads = base_sizes[n - 2] - 1, []
            for _ in range(K):
                c = start + 1
                while not (_naive_is_prime(c) and c not in used):
                    c += 1
                used.add(c)
                heads.append(c)
                start = c
            per_n.append(heads)
        sizes[L] = per_n
    out = {}
    B, T = len(ids), len(ids[0])
    for L in layer_ids:
        rng = np.random.default_rng(seed + 10007 * L)
        mult = [2 * int(r) + 1 for r in rng.integers(0, bound, size=N, dtype=np.int64)]
        res = [[[0] * ((N - 1) * K) for _ in range(T)] for _ in range(B)]
        for b in range(B):
            for t in range(T):
                col = 0
                for n in range(2, N + 1):
                    mix = 0
                    for k in range(n):
                        tok = ids[b][t - k] if t - k >= 0 else pad_id
                        mix ^= _wrap64(tok * mult[k])
                        mix = _wrap64(mix)
                    for p in sizes[L][n - 2]:
                        res[b][t][col] = mix % p  # Python % is non-negative for p > 0, like numpy's
                        col += 1
        out[L] = np.array(res, dtype=np.int64)
    return out, sizes


@pytest.mark.parametrize(
    "V,N,K,base,layers,pad,seed,B,T",
    [
        (5180, 3, 8, [25900, 25900], [1, 3], 1, 0, 3, 37),
        (129280, 3, 8, [646400, 646400], [1, 15], 2, 0, 2, 19),  # the demo's sizes
        (97, 4, 3, [50, 70, 90], [0, 2, 5], 7, 123, 2, 11),
        (2, 2, 1, [3], [4], 0, 5, 1, 3),  # tiny vocab: multipliers near 2**62
    ],
)
def test_bit_exact_with_reference(V, N, K, base, layers, pad, seed, B, T):
    rng = np.random.default_rng(V + T)
    ids = rng.integers(0, V, size=(B, T), dtype=np.int64)
    ids[0, : min(3, T)] = V - 1  # extreme ids
    h = NgramHasher(V, N, K, base_sizes=base, layer_ids=layers, pad_id=pad, seed=seed)
    got = h.hash(ids)
    want, sizes = reference_hash(ids.tolist(), V, N, K, base, layers, pad, seed)
    assert h.table_sizes == sizes
    for L in layers:
        assert got[L].dtype == np.int64 and got[L].shape == (B, T, (N - 1) * K)
        diff = got[L] != want[L]
        assert not diff.any(), f"layer {L}: {int(diff.sum())} of {diff.size} row ids differ"


def test_demo_primes_and_offsets():
    h = NgramHasher(129280, 3, 8, base_sizes=[646400, 646400], layer_ids=[1, 15], pad_id=2)
    flat = [p for L in (1, 15) for p in h.head_sizes(L)]
    assert len(set(flat)) == 32 and all(is_prime(p) and p >= 646400 for p in flat)
    assert flat == sorted(flat)  # one running search in layer/order/head order
    offs = h.head_offsets(1)
    assert offs[0] == 0 and offs[1] == h.table_sizes[1][0][0]
    assert h.total_rows(1) == sum(h.head_sizes(1))


def test_is_prime_matches_trial_division():
    got = [n for n in range(5000) if is_prime(n)]
    want = [n for n in range(5000) if _naive_is_prime(n)]
    assert got == want
    assert is_prime(2_262_401) == _naive_is_prime(2_262_401)


def test_torch_input_and_pad_positions():
    h = NgramHasher(50, 3, 2, base_sizes=[60, 80], layer_ids=[0], pad_id=3)
    ids = torch.tensor([[3, 3, 3, 10]])
    out = h.hash_torch(ids)[0]
    # a sequence of pad ids hashes like the padding before it: positions 0..2 agree
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 1], out[0, 2])
    assert not torch.equal(out[0, 2], out[0, 3])


def test_input_validation():
    h = NgramHasher(10, layer_ids=[0])
    with pytest.raises(InvalidIdError):
        h.hash(np.array([[0, 10]]))
    with pytest.raises(InvalidIdError):
        h.hash(np.array([[-1, 0]]))
    with pytest.raises(InvalidIdError):
        h.hash(np.array([0, 1]))
    with pytest.raises(IdTypeError):
        h.hash(np.array([[0.0, 1.0]]))
    with pytest.raises(EngramConfigError):
        NgramHasher(10, 3, base_sizes=[20], layer_ids=[0])
    with pytest.raises(EngramConfigError):
        NgramHasher(10, layer_ids=[1, 1])
    with pytest.raises(EngramConfigError):
        NgramHasher(10, pad_id=10)
    assert h.hash(np.zeros((2, 0), dtype=np.int64))[0].shape == (2, 0, 16)
