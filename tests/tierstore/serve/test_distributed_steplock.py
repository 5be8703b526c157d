"""The sharded exchange is step-locked (issue 22 item 1): a rank whose own input is bad, a
rank that cannot serve its rows, or ranks that call different tables make EVERY rank raise a
typed error for that call, and the next call is in step: rows bit-exact, never another
table's rows. Two gloo ranks on loopback; the shards are built once, in the test process."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import tierstore
from tierstore.errors import ShardDesyncError, ShardedLookupError
from tierstore.format.spec import PAGE_SIZE
from tierstore.serve.distributed import build_shard, open_sharded

from ...conftest import bits, free_port, random_table

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them

# two tables of the same shape and dtype: a lookup paired with the peer's lookup of the
# other table would return rows of the wrong table without any error
A, B = "blocks.1.engram.memory.weight", "blocks.2.engram.memory.weight"
ROWS, DIM, WORLD = 1000, 16, 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("steplock")
    save_file({A: random_table(ROWS, DIM, torch.float32, seed=1), B: random_table(ROWS, DIM, torch.float32, seed=2)},
              str(tmp / "m.safetensors"))
    for rank in range(WORLD):
        build_shard(tmp / "m.safetensors", tmp / "sharded", rank, WORLD, progress=False)
    return tmp


def _spawn(worker, tmp: Path) -> None:
    mp.spawn(worker, args=(free_port(), str(tmp)), nprocs=WORLD, join=True)


def _open(rank: int, port: int, tmp: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    # budgets 0: every row is read from the shard's files (and checked against its checksums)
    return open_sharded(Path(tmp) / "sharded", device="cpu", timeout=20), load_file(str(Path(tmp) / "m.safetensors"))


def _exact(store, ckpt: dict, rank: int, step: str) -> None:
    """Three lookups, alternating tables, each rank with its own ids: rows equal the checkpoint's."""
    rng = np.random.default_rng(100 + rank)
    for name in (B, A, B):
        ids = rng.integers(0, ROWS, 64)
        got = store.lookup(name, ids)
        assert torch.equal(bits(got), bits(ckpt[name][ids])), f"rank {rank} after {step}: rows of {name} wrong"


def _raises_for_every_rank(rank: int, culprit: int, own_error: type, call) -> None:
    """``call`` raises ``own_error`` on the rank whose input is bad, ShardedLookupError naming it elsewhere."""
    if rank == culprit:
        with pytest.raises(own_error):
            call()
    else:
        with pytest.raises(ShardedLookupError, match=own_error.__name__) as e:
            call()
        assert e.value.ranks == (culprit,) and not isinstance(e.value, ShardDesyncError)


def _input_errors_worker(rank: int, port: int, tmp: str) -> None:
    store, ckpt = _open(rank, port, tmp)
    _exact(store, ckpt, rank, "open")
    # the repro: a caller bug on rank 0 only (an id past the table)
    _raises_for_every_rank(rank, 0, tierstore.InvalidIdError,
                           lambda: store.lookup(A, [10**9] if rank == 0 else [1, 2, 3, 4]))
    _exact(store, ckpt, rank, "a bad id on rank 0")
    _raises_for_every_rank(rank, 1, tierstore.UnknownTableError,
                           lambda: store.lookup("no.such.table" if rank == 1 else A, [5, 6]))
    _exact(store, ckpt, rank, "an unknown table on rank 1")
    _raises_for_every_rank(rank, 1, tierstore.IdTypeError, lambda: store.lookup(A, [0.5] if rank == 1 else [5]))
    _exact(store, ckpt, rank, "float ids on rank 1")
    bad_out = torch.empty(3, DIM, dtype=torch.float64 if rank == 0 else torch.float32)
    _raises_for_every_rank(rank, 0, tierstore.TierStoreError, lambda: store.lookup(A, [7, 8, 9], out=bad_out))
    _exact(store, ckpt, rank, "a bad out= on rank 0")
    # prefetch: the bad rank raises at the call, the peer from result()
    if rank == 0:
        with pytest.raises(tierstore.InvalidIdError):
            store.prefetch(B, [-1])
    else:
        fut = store.prefetch(B, [3])
        with pytest.raises(ShardedLookupError, match="InvalidIdError"):
            fut.result(timeout=60)
    _exact(store, ckpt, rank, "a bad prefetch on rank 0")
    _raises_for_every_rank(rank, 1, tierstore.InvalidIdError,
                           lambda: store.prefetch_many({A: [1], B: [ROWS] if rank == 1 else [2]}).result(timeout=60))
    _exact(store, ckpt, rank, "a bad prefetch_many on rank 1")
    # a bad hint raises on its rank; the peer's hint is advice and is dropped silently
    if rank == 0:
        with pytest.raises(tierstore.InvalidIdError):
            store.hint(A, [ROWS + 1])
    else:
        store.hint(A, [1, 2, 3])
    _exact(store, ckpt, rank, "a bad hint on rank 0")
    store.close()
    dist.destroy_process_group()


def test_a_rank_with_bad_input_keeps_the_group_in_step(shards):
    _spawn(_input_errors_worker, shards)


def _desync_worker(rank: int, port: int, tmp: str) -> None:
    store, ckpt = _open(rank, port, tmp)
    _exact(store, ckpt, rank, "open")
    with pytest.raises(ShardDesyncError, match="out of step") as e:  # ranks call different tables
        store.lookup(A if rank == 0 else B, [1, 2, 3])
    assert e.value.ranks == (1,)  # the ranks whose call differs from rank 0's
    _exact(store, ckpt, rank, "a lookup of another table")
    # another kind of call: rank 0's hint meets rank 1's lookup; rank 0 learns it at its next call
    if rank == 0:
        store.hint(A, [1, 2])
        with pytest.raises(ShardDesyncError, match="hint"):
            store.lookup(A, [3])
    else:
        with pytest.raises(ShardDesyncError, match="hint"):
            store.lookup(A, [4])
        with pytest.raises(ShardedLookupError, match="ShardDesyncError"):  # rank 0 raises its hint's error
            store.lookup(A, [5])
    _exact(store, ckpt, rank, "a hint against a lookup")
    store.close()
    dist.destroy_process_group()


def test_ranks_that_call_different_tables_raise_desync(shards):
    _spawn(_desync_worker, shards)


def _serve_error_worker(rank: int, port: int, tmp: str) -> None:
    store, ckpt = _open(rank, port, tmp)
    if rank == 1:  # rank 1's first page of A is corrupt: the page of its local rows 0.. (global 1, 3, ...)
        info = store.local.tables[A]
        with open(Path(store.local.path) / info.file, "r+b") as f:
            f.seek(PAGE_SIZE)
            byte = f.read(1)
            f.seek(PAGE_SIZE)
            f.write(bytes([byte[0] ^ 0x40]))
    dist.barrier()
    # rank 0 asks rank 1 for global row 1; rank 1 asks only for rows of rank 0
    if rank == 1:
        with pytest.raises(tierstore.CorruptDataError):
            store.lookup(A, [0, 2])
    else:
        with pytest.raises(ShardedLookupError, match="CorruptDataError") as e:
            store.lookup(A, [1, 2])
        assert e.value.ranks == (1,)
    got = store.lookup(B, np.arange(ROWS))  # every row of B (A's page stays corrupt)
    assert torch.equal(bits(got), bits(ckpt[B])), f"rank {rank} after a corrupt page on rank 1"
    store.close()
    dist.destroy_process_group()


def test_a_rank_that_cannot_serve_its_rows_fails_every_rank_in_step(shards, tmp_path):
    import shutil

    shutil.copytree(shards / "sharded", tmp_path / "sharded")  # the corruption stays in this copy
    (tmp_path / "m.safetensors").symlink_to(shards / "m.safetensors")
    _spawn(_serve_error_worker, tmp_path)
