"""Stores as older versions wrote them, for the tests that check they still open."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import zstandard

from tierstore.format.order import DenseOrder, load_order, write_order
from tierstore.format.profile import profile_paths
from tierstore.format.spec import TableInfo, manifest_digest


def save_v1_profile(store: Path, table: str, counts: np.ndarray) -> None:
    """A profile as a store written before profile version 2 holds it: one count per table row."""
    data, meta = profile_paths(store, table)
    data.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, counts.astype(np.int32))
    data.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(buf.getvalue()))
    meta.write_text(json.dumps({"format": "tierstore-profile", "version": 1, "table": table, "rows": counts.size,
                                "dtype": "int32", "total": int(counts.sum()),
                                "nonzero": int(np.count_nonzero(counts))}))


def as_version3(out: Path) -> None:
    """Rewrite a hot-ordered store's order file as version 3 wrote it (each row's position, the
    dense order file) and its manifest as version 3."""
    m = json.loads((out / "manifest.json").read_text())
    t = m["tables"][0]
    info = TableInfo(**t)
    pos = load_order(out, info, m["build_id"]).of(np.arange(info.rows))
    with open(out / t["order_file"], "wb") as f:
        write_order(f, info, pos, m["build_id"])
    m["version"] = 3
    m["digest"] = manifest_digest(m)
    (out / "manifest.json").write_text(json.dumps(m))
    assert isinstance(load_order(out, info, m["build_id"]), DenseOrder)
