"""Writing a store's hot-set snapshots (``tierstore.save_snapshot``; the file format is
``tierstore.format.snapshot``).

A snapshot holds a table's profiled rows, hottest first, packed, so that open reads the
tiers' hot sets sequentially instead of a page per row (``tierstore.tiers.hotset``).
``tierstore profile --save-profile`` writes one per table after saving its profile.

The rows are read from the store's row file by its disk tier in file order
(``DiskTier.sweep``: large sequential direct reads of the spans holding ranked rows, several
windows in flight, every page checked against its checksum), and put in rank order by the
snapshot writer's rank pass (``format.rankspill``), in memory up to 8 x ``chunk_bytes`` of rows
(256 MiB at most), else the first bucket held in memory and the others spilled into the
snapshot's own row region and read back a bucket at a time.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import TierStoreError
from ..files import atomic_write
from ..format.profile import has_profile, hot_rows, load_profile, profile_info, profile_paths
from ..format.rankspill import BUCKET_BYTES
from ..format.snapshot import DEFAULT_SNAPSHOT_BYTES, snapshot_path, write_snapshot
from ..format.writer import one_torch_thread
from ..sizes import parse_size
from .store import Store

__all__ = ["save_snapshot", "DEFAULT_SNAPSHOT_BYTES"]


def save_snapshot(store: str | os.PathLike[str], tables: Iterable[str] | None = None, *,
                  max_bytes: int | str = DEFAULT_SNAPSHOT_BYTES, chunk_bytes: int | str = "32MiB"
                  ) -> dict[str, dict[str, Any]]:
    """Write the hot-set snapshot of each of ``tables`` (default: every table with a saved
    profile) from its profile; returns each snapshot's header (plus ``path``, ``bytes``,
    ``seconds``).

    max_bytes: rows per snapshot, in bytes of rows: the hottest profiled rows up to this
        (``"16GiB"`` by default, all profiled rows when they fit); 0 removes the snapshot.
        Tiers whose hot set is larger load the rest from the row file.
    chunk_bytes: sizes the rank pass's memory: rows up to 8 x this (at most 256 MiB) are put in
        rank order in memory, more are bucketed through the file in buckets of that size.

    Atomic per table (a killed write leaves the old snapshot or the new one). Raises
    ``TierStoreError`` for a table without a profile.
    """
    max_bytes = parse_size(max_bytes, what="max_bytes")
    chunk = parse_size(chunk_bytes, what="chunk_bytes")
    if chunk <= 0:
        raise TierStoreError(f"chunk_bytes={chunk_bytes!r} must be positive")
    out: dict[str, dict[str, Any]] = {}
    with Store(store, device="cpu", device_budget=0, host_budget=0, use_profile=False) as s:
        names = list(s.tables) if tables is None else list(tables)
        for name in names:
            info = s.tables.get(name)
            if info is None:
                raise TierStoreError(f"no table {name!r} in store {store!s}; tables: {', '.join(sorted(s.tables))}")
            path = snapshot_path(store, name)
            k = min(info.rows, max_bytes // max(1, info.row_bytes))
            if tables is None and not has_profile(store, name):
                continue
            # read before the counts: a profile saved meanwhile leaves this snapshot with the
            # old id, so open does not take its ranking for the new profile's
            meta = profile_info(store, name)  # raises, naming the fix, when there is none
            if not isinstance(meta.get("profile_id"), str):  # saved before profiles had an id: give it one,
                meta = {**meta, "profile_id": uuid.uuid4().hex}  # so open can take the ranking from the snapshot
                atomic_write(profile_paths(store, name)[1], json.dumps(meta, indent=1).encode())
            if k <= 0:
                path.unlink(missing_ok=True)
                continue
            # only the k hottest rows (streamed out of the profile: never a count per table row)
            counts = load_profile(store, name, n_rows=info.rows, missing_ok=False, top=k)
            ranked = hot_rows(counts, k)  # the one ranking: every tier's hot set is a prefix
            del counts

            disk = s._table(name).disk  # rows straight from the row file, in file order, every page checked
            with one_torch_thread():  # the write's own threads are its parallelism (as the build's)
                head = write_snapshot(path, info, s.manifest.build_id, ranked, sweep=disk.sweep,
                                      memory=min(chunk * 8, BUCKET_BYTES),
                                      bucket_bytes=min(chunk * 8, BUCKET_BYTES),
                                      profile={"total": meta["total"], "nonzero": meta["nonzero"],
                                               "profile_id": meta.get("profile_id")})
            out[name] = {**head, "path": str(Path(path))}
    return out
