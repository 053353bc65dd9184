import pytest

from pipeline.errors import ConfigError
from pipeline.units import parse_duration, parse_size


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), ("64KiB", 65536), ("32MiB", 32 << 20), ("1GiB", 1 << 30), ("1.5KiB", 1536), ("2mb", 2_000_000), (7, 7),
])
def test_sizes_with_units_parse_to_bytes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,expected", [("25ms", 0.025), ("2", 2.0), ("1.5s", 1.5), ("100us", 1e-4), (3, 3.0)])
def test_durations_with_units_parse_to_seconds(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "MiB", "12 parsecs", "-3", "1e"])
def test_bad_sizes_are_config_errors(text):
    with pytest.raises(ConfigError, match="not a size"):
        parse_size(text)


def test_bad_duration_names_the_value():
    with pytest.raises(ConfigError, match="'soon'"):
        parse_duration("soon")
