import pytest

from budget_callback.units import format_bytes, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [("12GB", 12 * 1000**3), ("12GiB", 12 * 1024**3), ("1.5KiB", 1536), ("500 MB", 500 * 1000**2), ("7", 7),
     ("3b", 3), ("1TB", 1000**4), (4096, 4096)],
)
def test_parse_size_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "12XB", "-5GB", "1..2GB", 0, -1, "0GB", True, 1.5, None])
def test_parse_size_rejects_and_names_argument(bad):
    with pytest.raises(ValueError, match="`disk_budget`"):
        parse_size(bad, "disk_budget")


def test_format_bytes_means_its_units():
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(1536, binary=False) == "1.54 kB"
    assert format_bytes(12 * 1024**3) == "12.00 GiB"
    assert format_bytes(999) == "999 B"
