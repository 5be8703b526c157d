"""Compiled kernels are cached on disk per source version, shared safely between processes,
and a warm process loads them without compiling."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_processes_share_the_kernel_cache_and_a_warm_one_compiles_nothing(tmp_path):
    """A second process loads the first one's walk, compiles another policy's and saves it
    (this crashed while numba pickled the policy kernels by random per-process ids); a third
    loads both without compiling anything."""
    assert _run(tmp_path, "lru") == 1  # cold: compiled
    assert _run(tmp_path, "lru", "s3fifo") == 1  # lru loaded, s3fifo compiled and saved
    assert _run(tmp_path, "lru", "s3fifo") == 0  # warm: nothing compiled
    assert len(list(tmp_path.iterdir())) == 1, "one cache directory per source version"
