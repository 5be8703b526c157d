"""docs/api.md is the public API: every name in ``tierstore.__all__`` is listed there and every
name listed resolves, so removing (or renaming) a public name fails here; the RowStore
members and the StoreOptions fields it lists are exactly the code's."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import tierstore

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def _table(section: str) -> list[str]:
    """The backticked first cells of the table under the heading that starts with ``section``."""
    text = DOC.read_text()
    start = text.index(f"\n## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start: end if end != -1 else None]
    return re.findall(r"^\| `([^`]+)` \|", body, flags=re.M)


def test_every_public_name_is_listed_and_every_listed_name_resolves():
    listed = _table("Names")
    assert len(listed) == len(set(listed)), "a name is listed twice"
    assert set(tierstore.__all__) <= set(listed), f"public but not in docs/api.md: {set(tierstore.__all__) - set(listed)}"
    assert set(listed) <= set(tierstore.__all__), f"in docs/api.md but not in tierstore.__all__: " \
                                                  f"{set(listed) - set(tierstore.__all__)}"
    for name in listed:
        assert getattr(tierstore, name, None) is not None, f"tierstore.{name} does not resolve"


def test_rowstore_members_are_the_protocols():
    listed = set(_table("`RowStore`"))
    members = set(getattr(tierstore.RowStore, "__protocol_attrs__", None)  # Python 3.12+
                  or typing._get_protocol_attrs(tierstore.RowStore))  # type: ignore[attr-defined]
    assert listed == members, (listed ^ members)
    for cls in (tierstore.Store, tierstore.ShardedStore):
        missing = [m for m in listed if not hasattr(cls, m) and m not in ("tables", "device")]
        assert not missing, f"{cls.__name__} lacks {missing}"


def test_store_options_fields_are_the_dataclasses():
    fields = [f.name for f in dataclasses.fields(tierstore.StoreOptions) if f.init]
    assert _table("`StoreOptions` fields") == fields
