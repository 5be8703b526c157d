import pytest

from tierstore import BudgetError, parse_size


@pytest.mark.parametrize("text,expected", [
    ("0", 0), ("64MiB", 64 << 20), ("1.5GiB", 3 << 29), ("2GB", 2_000_000_000), ("512", 512),
    ("4 KiB", 4096), (1234, 1234), (None, 0), ("1e3", 1000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["-1", "64 parsecs", "MiB", "", -5, True, [1], float("nan")])
def test_parse_size_rejects(bad):
    with pytest.raises(BudgetError) as e:
        parse_size(bad, what="host_budget")
    assert "host_budget" in str(e.value)
