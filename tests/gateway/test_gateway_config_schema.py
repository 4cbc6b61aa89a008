"""The gateway config's schema: one loader walks every table; hostile files get a
ConfigError naming file:line: table.field (never a traceback, never a hang)."""

import pytest

from nexus_limits.gateway import ConfigError, load_config
from nexus_limits.gateway.config import SCHEMA, Tier

BASE = '[upstream]\nurl = "http://127.0.0.1:1"\n[tiers.t]\nrequests = "1/s"\n'


def check(tmp_path, text, name="gw.toml"):
    path = tmp_path / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert len(message) < 600, "an error never carries a whole huge value"
    return message.removeprefix(str(path))


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ('requests = "2/s"\n', ":5: tiers.t.requests: given twice"),
        ('[tiers.t]\ntokens = "1/s"\n', ":5: tiers.t: given twice"),
        ("[server]\nport = 99999999999999999999999999999999\n", ":6: server.port: must be from 1 to 65535"),
        ("[server]\nmax_body_bytes = 1e400\n", ":6: server.max_body_bytes: must be a whole number, got inf"),
        ("[gateway]\nlease_ttl = nan\n", ":6: gateway.lease_ttl: must be above 0 and at most 604800, got nan"),
        ("[gateway]\nlease_ttl = -inf\n", ":6: gateway.lease_ttl: must be above 0"),
        ('[upstream.adaptive]\nceiling = "1/s"\ninterval = inf\n', ":7: upstream.adaptive.interval: must be from 0"),
        ("x = " + "[" * 5000 + "]" * 5000 + "\n", ":1: invalid TOML: nested too deeply"),
        ("[tiers.t.a.b.c]\nx = 1\n", ":5: tiers.t.a: unknown field"),
        ("[servr]\nport = 1\n", ":5: servr: unknown section; did you mean 'server'?"),
        ("[gateway]\nrelaod = 'off'\n", ":6: gateway.relaod: unknown field; did you mean 'reload'?"),
        ('[gateway]\nreload = "' + "x" * 100_000 + '"\n', ":6: gateway.reload: must be 'sighup', 'watch' or 'off'"),
        ('[tiers.u]\ntokens = "' + "9" * 40 + '/s"\n', ":6: tiers.u.tokens: invalid rate"),
        ("[tiers.u]\ndaily_tokens = " + "9" * 40 + "\n", ":6: tiers.u.daily_tokens: daily_tokens"),
        ("[tiers.u]\nconcurrency = 1.5\n", ":6: tiers.u.concurrency: must be a whole number"),
        ("[tiers.u]\nqueue = nan\nrequests = '1/s'\n", ":6: tiers.u.queue: must be a wait above 0"),
        ('[tiers.u]\nqueue = "1e999s"\nrequests = "1/s"\n', ":6: tiers.u.queue: must be a wait"),
        ("[tiers]\nu = 5\n", ":6: tiers.u: must be a table"),
        ("[keys]\nk = { a = 1 }\n", ":6: keys[…][…]: unknown field (expected one of: tier, team)"),
        ("[keys]\nk = 5\n", ":6: keys[…]: tier 5 is not defined"),
        ("server = 5\n", ":1: server: must be a table"),
        ('[prices."m.x"]\ninput = "1"\noutput = "2"\ncahced_input = "1"\n', ":8: prices.m.x.cahced_input: unknown"),
    ],
)
def test_hostile_toml_is_named_by_file_line_and_field(tmp_path, extra, where):
    if extra.startswith(("x = ", "server = ")):
        text = extra + BASE
    else:
        text = BASE + extra
    assert where in check(tmp_path, text)


def test_upstream_needs_its_url(tmp_path):
    assert ":1: upstream: needs url" in check(tmp_path, '[upstream]\n[tiers.t]\nrequests = "1/s"\n')


def test_a_file_that_is_not_utf8_or_too_large(tmp_path, monkeypatch):
    assert ":2: the config must be UTF-8" in check(tmp_path, b'[upstream]\nurl = "\xff"\n')
    import nexus_limits.gateway.schema as schema

    monkeypatch.setattr(schema, "MAX_CONFIG_BYTES", 100)
    assert "is larger than" in check(tmp_path, BASE + "#" * 200)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("upstream:\n  url: http://x\ntiers:\n  t:\n    requests: 1/s\n    requests: 2/s\n", ":6: tiers.t.requests: given twice"),
        ("a: " + "[" * 3000 + "]" * 3000 + "\n", ":1: invalid YAML: nested too deeply"),
        ("upstream:\n  url: http://x\ntiers:\n  t:\n    requests: 1/s\nkeys:\n  123: t\n", ":7: keys[…]: names must be strings (quote it), got an integer"),
        ("upstream:\n  url: http://x\ntiers:\n  t:\n    requests: {a: 1}\n", ":5: tiers.t.requests: must be a rate"),
        ("upstream:\n  url: http://x\ntiers:\n  t:\n    concurrency: .nan\n", ":5: tiers.t.concurrency: must be a whole"),
        ("upstream:\n  url: http://x\nserver:\n  port: .inf\ntiers: {t: {requests: 1/s}}\n", ":4: server.port: must be a port"),
    ],
)  # fmt: skip
def test_hostile_yaml_is_named_by_file_line_and_field(tmp_path, text, where):
    pytest.importorskip("yaml")
    assert where in check(tmp_path, text, "gw.yaml")


def test_yaml_aliases_are_walked_once(tmp_path):
    """A 'billion laughs' document: every alias is a reference; nothing is expanded."""
    pytest.importorskip("yaml")
    levels = ['a: &a ["x", "x"]'] + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    assert ":1: a: unknown section" in check(tmp_path, "\n".join(levels) + "\n", "gw.yaml")


def test_every_field_of_the_schema_is_a_tier_or_config_attribute():
    """The schema is the one description: each field lands on the public dataclasses."""
    from dataclasses import fields

    from nexus_limits.gateway.config import GatewayConfig

    config_attrs = {f.name for f in fields(GatewayConfig)}
    tier_attrs = {f.name for f in fields(Tier)}
    for table in SCHEMA:
        for f in table.fields:
            if table.name in ("upstream", "server", "gateway", "backend"):
                assert f.target in config_attrs, (table.name, f.name)
            elif table.name == "tiers":
                assert f.target in tier_attrs, f.name
