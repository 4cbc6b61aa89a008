"""Hostile input, generated: every parser and loader either answers or raises one of its
documented exceptions, and never admits more than the quota allows."""

from __future__ import annotations

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nexus_limits as nl
from nexus_limits.adapters._common import Request, client_ip, parse_key_spec
from nexus_limits.gateway import ConfigError, load_config
from nexus_limits.tokens import (
    UsageError,
    UsageStream,
    count_request_tokens,
    extract_usage,
    parse_go_duration,
    parse_rate_limit_headers,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
text = st.text(st.characters(codec="utf-8"), max_size=60)
rateish = st.one_of(
    text,
    st.builds(
        lambda n, u: f"{n}/{u}",
        st.integers(-5, 10**20),
        st.sampled_from(["s", "second", "minute", "m", "h", "hour", "day", "d", "7d", "0s", "week", "minut", ""]),
    ),
)


@SETTINGS
@given(rateish)
def test_rate_parser_never_crashes(value):
    try:
        rate = nl.Rate.parse(value)
    except ValueError as error:
        assert str(error)
        return
    assert rate.count >= 1 and rate.period > 0
    assert nl.Rate.parse(str(rate)) == rate


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=20,
)


@SETTINGS
@given(json_values, st.sampled_from([None, "openai", "anthropic", "openai-responses"]))
def test_usage_parser_answers_or_raises_usage_error(body, provider):
    try:
        usage = extract_usage(body, provider)
    except UsageError:
        return
    assert usage.input_tokens >= 0 and usage.output_tokens >= 0


@SETTINGS
@given(st.lists(st.binary(max_size=80) | st.sampled_from([b"data: ", b"\n\n", b"event: message_delta\n", b"\r\n"])))
def test_sse_parser_takes_any_bytes(chunks):
    stream = UsageStream()
    for chunk in chunks:
        stream.feed(chunk)
    stream.finish()


@SETTINGS
@given(st.dictionaries(st.sampled_from(["usage", "stream_options"]), json_values) | json_values)
def test_usage_of_sse_events_with_random_json(doc):
    stream = UsageStream("openai")
    stream.feed(b"data: " + json.dumps(doc, default=str).encode() + b"\n\n")
    stream.feed(b"data: [DONE]\n\n")
    stream.finish()


@SETTINGS
@given(json_values)
def test_request_token_counter_answers_or_raises_value_error(body):
    try:
        count = count_request_tokens(body if isinstance(body, dict) else {"messages": body})
    except (ValueError, TypeError):
        return
    assert count.tokens >= 0


header_names = st.sampled_from(
    [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
        "retry-after",
        "anthropic-ratelimit-tokens-reset",
        "anthropic-ratelimit-requests-remaining",
        "retry-after-ms",
    ]
)


@SETTINGS
@given(st.dictionaries(header_names, text | st.integers().map(str), max_size=6))
def test_upstream_header_parser_never_crashes(headers):
    limits = parse_rate_limit_headers(headers)
    assert limits is not None


@SETTINGS
@given(text)
def test_go_duration_parser(value):
    try:
        seconds = parse_go_duration(value)
    except ValueError:
        return
    assert seconds >= 0


addresses = st.one_of(
    st.ip_addresses().map(str),
    st.builds(lambda ip: f"[{ip}]:443", st.ip_addresses(v=6)),
    text,
)


@SETTINGS
@given(addresses, st.lists(addresses, max_size=5), st.booleans())
def test_client_ip_from_hostile_forwarding_headers(peer, hops, forwarded):
    # Per address (ipv6_prefix=128), reading the header this request carries.
    trusted = parse_key_spec(
        "ip",
        ["10.0.0.0/8", "::1/128"],
        forwarded_header="forwarded" if forwarded else "x-forwarded-for",
        ipv6_prefix=128,
    )
    headers = {"forwarded": ", ".join(f"for={h}" for h in hops)} if forwarded else {"x-forwarded-for": ", ".join(hops)}
    ip = trusted(Request("GET", "/", headers, "", peer))
    # Never an address the peer did not vouch for: the peer itself, or a parsed hop.
    assert ip is None or ip == client_ip(Request("GET", "/", {}, "", peer), []) or any(ip in h for h in hops)


toml_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(str),
    st.booleans().map(lambda b: "true" if b else "false"),
    text.map(json.dumps),
    st.sampled_from(['"100/minute"', '"25.00/day"', '"bearer"', '"redis"', '"http://127.0.0.1:1"', "[]", "{}"]),
)
sections = st.sampled_from(
    ["upstream", "server", "gateway", "backend", "tiers.free", "tiers.pro", "keys", "prices.m", "x"]
)
fields = st.sampled_from(
    ["url", "port", "key", "requests", "tokens", "concurrency", "type", "reload", "spend", "shadow", "input", "sk"]
)


@SETTINGS
@given(st.lists(st.tuples(sections, st.lists(st.tuples(fields, toml_scalars), max_size=4)), max_size=6))
def test_config_loader_raises_only_config_errors(tmp_path_factory, doc):
    lines = []
    for section, items in doc:
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in items]
    path = tmp_path_factory.mktemp("cfg") / "gw.toml"
    path.write_text("\n".join(lines))
    try:
        load_config(str(path))
    except ConfigError as error:
        assert str(error).startswith(str(path))


@SETTINGS
@given(st.text(string.printable, max_size=300))
def test_yaml_loader_raises_only_config_errors(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("cfg") / "gw.yaml"
    path.write_text(body)
    try:
        load_config(str(path))
    except ConfigError as error:
        assert str(error).startswith(str(path))


costs = st.integers(0, 12)


@SETTINGS
@given(
    kind=st.sampled_from([nl.TokenBucket, nl.FixedWindow, nl.SlidingWindow, nl.LeakyBucket]),
    limit=st.integers(1, 20),
    ops=st.lists(st.tuples(costs, st.integers(0, 3_000)), max_size=80),
)
def test_never_more_admitted_than_the_quota_in_any_window(kind, limit, ops):
    """Over any period-long interval a limiter admits at most what its definition allows:
    the limit (burst) plus what refills, or twice the limit for the window counters."""
    clock = nl.ManualClock()
    period = 10.0
    lim = kind(nl.Rate(limit, period), clock=clock)
    admitted = []
    for cost, advance_ms in ops:
        clock.advance(advance_ms / 1000)
        if lim.hit("k", cost).allowed:
            admitted.append((clock.now, cost))
    for start, _ in admitted:
        # Any interval [start, end]: a bucket admits at most its burst plus what refilled.
        for end, _ in admitted:
            if end >= start and kind in (nl.TokenBucket, nl.LeakyBucket):
                used = sum(c for t, c in admitted if start <= t <= end)
                assert used <= limit + (end - start) * limit / period + 1e-9
        used = sum(c for t, c in admitted if start <= t < start + period)
        assert used <= 2 * limit
    if kind is nl.FixedWindow:
        for window in {int(t // period) for t, _ in admitted}:
            assert sum(c for t, c in admitted if int(t // period) == window) <= limit


def test_upstream_headers_with_infinite_or_nan_numbers():
    """Found by the fuzzer: float("inf") parses but is no integer."""
    for text in ("INFINITY", "-inf", "nan", "1e400"):
        limits = parse_rate_limit_headers({"x-ratelimit-limit-requests": text, "x-ratelimit-remaining-tokens": text})
        assert limits is not None
