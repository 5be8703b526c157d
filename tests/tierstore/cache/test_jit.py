"""Compiled kernels are cached on disk per source version, shared safely between processes,
and a warm process loads them without compiling."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them

REPO = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from tierstore.cache import CacheIndex, walk
    from tierstore.analysis.simulate import replay
    trace = np.random.default_rng(0).integers(0, 500, 5000)
    for name in sys.argv[1:]:
        idx = CacheIndex(500, 50, name, pinned_rows=[])
        replay(idx, trace, np.arange(trace.size + 1))
        assert idx.hits + idx.misses == trace.size
    print("MISSES", sum(walk.replay.stats.cache_misses.values()))
""")


def _run(cache: Path, *policies: str) -> int:
    env = dict(os.environ, TIERSTORE_KERNEL_CACHE=str(cache), PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", SCRIPT, *policies], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return int(p.stdout.split("MISSES")[1])


# -- a corrupt or unwritable cache ------------------------------------------------------------
WALK = textwrap.dedent("""
    import numpy as np
    from tierstore.cache import CacheIndex, walk
    from tierstore.analysis.simulate import replay
    from tests.conftest import ordered_dict_lru_hits
    trace = np.random.default_rng(0).integers(0, 500, 5000)
    idx = CacheIndex(500, 50, "lru", pinned_rows=[])
    replay(idx, trace, np.arange(trace.size + 1))
    assert idx.hits == ordered_dict_lru_hits(trace, 50), (idx.hits, ordered_dict_lru_hits(trace, 50))
    print("MISSES", sum(walk.replay.stats.cache_misses.values()))
""")
SMALL = textwrap.dedent("""
    import numpy as np
    from tierstore.ids import _first_out_of_range as k
    ids = np.random.default_rng(0).integers(0, 100, 1000)
    ids[617] = 100
    assert k(ids, 100) == 617 and k(ids, 101) == -1 and k(ids[:617], 100) == -1
    print("MISSES", sum(k.stats.cache_misses.values()))
""")
WARNING = "unreadable compiled-kernel cache entry"


def _checked(script: str, cache: Path, **env: str) -> tuple[int, str]:
    """Run ``script`` (its kernels checked against a reference) in a fresh process: (compiles, stderr)."""
    env = dict(os.environ, TIERSTORE_KERNEL_CACHE=str(cache), PYTHONPATH=str(REPO), **env)
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                       cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    return int(p.stdout.split("MISSES")[1]), p.stderr


def _damage(cache: Path, how: str, suffixes: tuple[str, ...], seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    files = [p for p in cache.rglob("*") if p.is_file() and p.suffix in suffixes]
    assert files and {p.suffix for p in files} == set(suffixes)
    for p in files:
        data = bytearray(p.read_bytes())
        if how == "truncate":
            data = data[: len(data) // 2]
        elif how == "empty":
            data = bytearray()
        elif how == "garbage":
            data = bytearray(rng.integers(0, 256, len(data), dtype=np.uint8).tobytes())
        else:  # "flip": one bit in the middle (of a data file: inside the pickled machine code)
            data[len(data) // 2] ^= 0x10
        p.write_bytes(bytes(data))


def _recovers(cache: Path, script: str) -> None:
    """A damaged cache: the next process compiles again (exact, checked by the script), warns
    once naming the directory, and the one after loads the rewritten entries silently."""
    compiled, err = _checked(script, cache)
    assert compiled >= 1, "the damaged kernel was compiled again"
    assert err.count(WARNING) == 1, err[-3000:]
    (sub,) = cache.iterdir()
    assert str(sub) in err, "the warning names the cache directory"
    compiled, err = _checked(script, cache)
    assert compiled == 0 and WARNING not in err, "the rewritten entries load without a compile or a word"


@pytest.fixture(scope="module")
def warm_small(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("kcache")
    assert _checked(SMALL, cache)[0] == 1
    return cache


@pytest.mark.parametrize("files", ["all", "data"])
@pytest.mark.parametrize("how", ["truncate", "empty", "garbage", "flip"])
def test_a_damaged_kernel_cache_entry_is_a_miss_recompiled_and_warned_once(warm_small, tmp_path, how, files):
    """Cache files truncated, emptied, overwritten with random bytes or with one bit flipped
    (every file, or the data files only, behind an intact index): numba raised
    UnpicklingError / EOFError / MemoryError in every later process until someone deleted
    the cache by hand, or loaded the damaged machine code. Each unreadable entry is now a miss."""
    cache = tmp_path / "kcache"
    shutil.copytree(warm_small, cache)
    _damage(cache, how, (".nbi", ".nbc") if files == "all" else (".nbc",))
    _recovers(cache, SMALL)


@pytest.fixture(scope="module")
def warm_walk(tmp_path_factory) -> Path:
    """A cache holding the LRU walk, compiled once (cold: one compile) by a fresh process."""
    cache = tmp_path_factory.mktemp("kcache_walk")
    assert _checked(WALK, cache)[0] == 1
    return cache


def test_processes_share_the_kernel_cache_and_a_warm_one_compiles_nothing(warm_walk, tmp_path):
    """A second process loads the first one's walk (compiled by ``warm_walk``'s process),
    compiles another policy's and saves it (this crashed while numba pickled the policy
    kernels by random per-process ids); a third loads both without compiling anything."""
    cache = tmp_path / "kcache"
    shutil.copytree(warm_walk, cache)
    assert _run(cache, "lru", "s3fifo") == 1  # lru loaded, s3fifo compiled and saved
    assert _run(cache, "lru", "s3fifo") == 0  # warm: nothing compiled
    assert len(list(cache.iterdir())) == 1, "one cache directory per source version"


def test_a_damaged_cache_of_the_walk_recompiles_it_exactly(warm_walk, tmp_path):
    """The walk (policy kernels pickled by identity into its entries): every file replaced by
    random bytes; the next process compiles it again and matches an OrderedDict LRU."""
    cache = tmp_path / "kcache"
    shutil.copytree(warm_walk, cache)
    _damage(cache, "garbage", (".nbi", ".nbc"))
    _recovers(cache, WALK)


def test_an_unwritable_cache_leaves_no_compiled_code_in_the_package(tmp_path):
    """With the configured directory unwritable numba fell back to the package's own
    ``__pycache__`` (and the docstring claimed an in-memory compile). Compiled code now goes
    to a private directory under the temp dir, named in one warning; kernels still run, exact."""
    blocker = tmp_path / "a-file"  # a path under a plain file: unwritable even for root
    blocker.write_bytes(b"")

    def compiled_in_package() -> set[tuple[Path, int]]:
        return {(p, p.stat().st_mtime_ns) for p in (REPO / "tierstore").rglob("*") if p.suffix in (".nbi", ".nbc")}

    before = compiled_in_package()
    temp = tmp_path / "temp"
    temp.mkdir()
    compiled, err = _checked(SMALL, blocker / "kernels", TMPDIR=str(temp))
    left = compiled_in_package() - before
    assert not left, f"compiled kernels written into the package: {sorted(left)[:5]}"
    (private,) = temp.iterdir()  # the fallback: a directory of ours alone, named in one warning
    assert private.name == f"tierstore-kernels-{os.getuid()}" and private.stat().st_mode & 0o077 == 0
    assert list(private.rglob("*.nbc")) and err.count(str(blocker / "kernels")) == 1 and str(private) in err, err
    assert _checked(SMALL, blocker / "kernels", TMPDIR=str(temp))[0] == 0, "the fallback serves the next process"
