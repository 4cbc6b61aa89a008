from __future__ import annotations

import pytest

import nexus_limits as nl


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("100/minute", 100, 60.0),
        ("100 per minute", 100, 60.0),
        ("10/s", 10, 1.0),
        ("10/second", 10, 1.0),
        ("10/seconds", 10, 1.0),
        ("5/2s", 5, 2.0),
        ("5 per 2 seconds", 5, 2.0),
        ("1000/hour", 1000, 3600.0),
        ("7/day", 7, 86400.0),
        ("3/week", 3, 604800.0),
        ("10/500ms", 10, 0.5),
        ("1/1.5h", 1, 5400.0),
        ("  42 / MINUTE ", 42, 60.0),
        ("1/1us", 1, 1e-6),
        ("1/us", 1, 1e-6),
        ("1/1µs", 1, 1e-6),  # MICRO SIGN
        ("1/1μs", 1, 1e-6),  # GREEK SMALL LETTER MU
        ("5 per 250 microseconds", 5, 250e-6),
        ("2/1.5usec", 2, 1.5e-6),
        ("1/0.001ms", 1, 1e-6),
        ("1/36525d", 1, 3_155_760_000.0),
    ],
)
def test_parse(text, count, period):
    rate = nl.Rate.parse(text)
    assert (rate.count, rate.period) == (count, period)
    assert nl.Rate.parse(str(rate)) == rate


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "no '/' or 'per'"),
        ("100", "no '/' or 'per'"),
        ("abc/minute", "whole number"),
        ("-1/minute", "whole number"),
        ("0/minute", "at least 1"),
        ("2.5/minute", "whole number"),
        ("10/fortnight", 'unknown period unit "fortnight"'),
        ("10/month", "no fixed length"),
        ("10/year", "no fixed length"),
        ("10/0s", "above 0"),
        ("10/-1s", "unknown period unit"),
        ("10/", "missing period unit"),
        ("10/nan s", "unknown period unit"),
        ("10/lightyear", "(use us, ms, s, m, h, d or w)"),
        ("1/0.999us", "at least 1 microsecond"),
        ("1/0.5us", "at least 1 microsecond"),
        ("1/36526d", "at most 36525 days"),
        ("1/5218w", "at most 36525 days"),
    ],
)
def test_parse_errors_name_the_problem(text, why):
    with pytest.raises(ValueError, match="invalid rate") as err:
        nl.Rate.parse(text)
    assert why in str(err.value)


def test_parse_wrong_type():
    with pytest.raises(TypeError, match="rate must be a str, got int"):
        nl.Rate.parse(100)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("count", "period", "exc", "why"),
    [
        (0, 1.0, ValueError, "at least 1"),
        (-5, 1.0, ValueError, "at least 1"),
        (2**60, 1.0, ValueError, "too large"),
        (2**70, 1.0, ValueError, "too large"),
        (1.5, 1.0, TypeError, "rate count must be an int"),
        (True, 1.0, TypeError, "rate count must be an int"),
        (1, 0.0, ValueError, "above 0"),
        (1, -1.0, ValueError, "above 0"),
        (1, float("nan"), ValueError, "above 0"),
        (1, float("inf"), ValueError, "above 0"),
        (1, 1e-9, ValueError, "at least 1 microsecond"),
        (1, 1e12, ValueError, "too long"),
        (1, 3_155_760_000.5, ValueError, "at most 36525 days, 100 years of 365.25 days"),
        (1, 0.999e-6, ValueError, "at least 1 microsecond"),
        (1, "60", TypeError, "rate period must be a number of seconds"),
    ],
)
def test_rate_numbers_are_validated(count, period, exc, why):
    with pytest.raises(exc, match=why):
        nl.Rate(count, period)


def test_rate_value_semantics():
    a = nl.Rate(100, 60)
    assert a == nl.Rate.parse("100/minute")
    assert a != nl.Rate(100, 61)
    assert (a == "100/minute") is False
    assert hash(a) == hash(nl.Rate.parse("100/minute"))
    assert repr(a) == "Rate(100, 60.0)"
    assert str(a) == "100/minute"
    assert str(nl.Rate(5, 90)) == "5/90s"
    assert len({a, nl.Rate(100, 60.0), nl.Rate(1, 1)}) == 2


def test_limiters_accept_rate_objects_and_strings():
    assert nl.TokenBucket(nl.Rate(3, 1.0)).rate == nl.TokenBucket("3/s").rate
    with pytest.raises(TypeError, match="rate must be a str"):
        nl.TokenBucket(3)  # type: ignore[arg-type]


def test_the_period_bounds_are_included_and_exact():
    """1 µs and 36,525 days (100 years of 365.25 days) are both accepted, by the parser
    and by Rate(count, seconds), and both print back to what parses to the same rate."""
    for rate in (nl.Rate(1, 1e-6), nl.Rate.parse("1/1us"), nl.Rate(1, 3_155_760_000), nl.Rate.parse("1/36525d")):
        assert nl.Rate.parse(str(rate)) == rate
    assert nl.Rate.parse("1/1us").period == 1e-6
    assert nl.Rate.parse("1/36525d").period == 3_155_760_000.0 == 36_525 * 86_400
    assert str(nl.Rate.parse("3/250us")) == "3/250us"
    assert str(nl.Rate.parse("7/us")) == "7/microsecond"
    assert nl.TokenBucket("1/1us").rate.period == 1e-6
