"""The names of [keys] are API keys: no config error prints one. Each error that names
a key keeps its file and line and shows the key masked (``keys["sk-l…5c"]``: its first
four and last two characters, nothing of a key under 16 characters), in TOML and YAML,
in the loader's checks and the cross-checks alike, in a failed reload's log line and in
``nexus-limits gateway --check``; errors about anything else read as they always did."""

import logging
import subprocess
import sys

import pytest

from nexus_limits.gateway import ConfigError, build_app, load_config
from nexus_limits.gateway.schema import mask

KEY = "sk-live-4f9a2b7c1d8e6f3a0b5c"
OTHER = "sk-live-9e8d7c6b5a4f3e2d1c0b"
SHOWN, OTHER_SHOWN = '["sk-l…5c"]', '["sk-l…0b"]'

# Six lines (TOML) and eight (YAML): a case's first line is the 7th, the 9th.
TOML = '[upstream]\nurl = "http://127.0.0.1:1"\n[tiers.pro]\nrequests = "10/s"\n[teams.t]\nrequests = "5/s"\n'
YAML = "upstream:\n  url: http://127.0.0.1:1\ntiers:\n  pro:\n    requests: 10/s\nteams:\n  t:\n    requests: 5/s\n"


def error_of(tmp_path, text, name):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert message.startswith(str(path)), message
    return message.removeprefix(str(path))


def assert_masked(message, *keys):
    """None of ``keys`` is in ``message``, nor the part of it a mask hides."""
    for key in keys:
        assert key not in message, message
        assert key[4:-2] not in message, message


# (TOML after the base, or before it for a case starting with "top:"; its error)
TOML_CASES = [
    (f'[keys]\n"{KEY}" = "gold"\n', f":8: keys{SHOWN}: tier 'gold' is not defined"),
    (f'[keys]\n"{KEY}" = {{ tier = "pro", team = "nope" }}\n', f":8: keys{SHOWN}.team: team 'nope' is not defined"),
    (f'[keys]\n"{KEY}" = {{ team = "t" }}\n', f":8: keys{SHOWN}: needs a tier (or set [gateway] default_tier)"),
    (
        f'[keys]\n"{KEY}" = {{ tier = "pro", teem = "t" }}\n',
        f":8: keys{SHOWN}.teem: unknown field; did you mean 'team'? (expected one of: tier, team)",
    ),
    (f'[keys]\n"{KEY}" = {{ tier = "pro", team = 5 }}\n', f":8: keys{SHOWN}.team: must be a team name"),
    # Another key inside an entry: named masked too, and never offered as a suggestion.
    (
        f'[keys]\n"{KEY}" = {{ tier = "pro", "{OTHER}" = "pro" }}\n',
        f":8: keys{SHOWN}[{OTHER_SHOWN[1:-1]}]: unknown field (expected one of: tier, team)",
    ),
    (f'[keys]\n"{KEY}" = "pro"\n"{KEY}" = "pro"\n', f":9: keys{SHOWN}: given twice (keep one)"),
    (f'[keys."{KEY}"]\ntier = "pro"\n[keys."{KEY}"]\ntier = "pro"\n', f":9: keys{SHOWN}: given twice (keep one)"),
    (f'[keys]\n"{KEY}" = "pro"\n[keys."{KEY}"]\ntier = "pro"\n', f":9: keys{SHOWN}: given twice (keep one)"),
    # The TOML parser's own words quote the key: left out.
    (
        f'[keys]\n"{KEY}" = {{ tier = "pro" }}\n"{KEY}".team = "t"\n',
        f":9: keys{SHOWN}.team: invalid TOML: Cannot mutate immutable namespace",
    ),
    (
        f'[keys]\n"{KEY}" = {{ tier = "pro", team = "t", team = "t" }}\n',
        f":8: keys{SHOWN}: invalid TOML: Duplicate inline table key",
    ),
    (f'top:keys = {{ "{KEY}" = "pro", "{KEY}" = "pro" }}\n', ":1: keys: invalid TOML: Duplicate inline table key"),
    (f'top:keys = {{ "{KEY}" = "gold" }}\n', f":1: keys{SHOWN}: tier 'gold' is not defined"),
    (f'top:keys."{KEY}" = "gold"\n', f":1: keys{SHOWN}: tier 'gold' is not defined"),
    # The [keys] header forgotten: the key lands in the table above, or at the top.
    (f'"{KEY}" = "pro"\n', f":7: teams.t{SHOWN}: unknown field (expected one of: org, "),
    (f'top:"{KEY}" = "pro"\n', f":1: {SHOWN}: unknown section (expected one of: upstream, "),
    # Any unknown name that holds a digit and is like no field's may be a key: masked.
    ('"sk-1" = "pro"\n', ":7: teams.t[…]: unknown field (expected one of: org, "),
]

YAML_CASES = [
    (f"keys:\n  {KEY}: gold\n", f":10: keys{SHOWN}: tier 'gold' is not defined"),
    (f"keys:\n  {KEY}: {{tier: pro, team: nope}}\n", f":10: keys{SHOWN}.team: team 'nope' is not defined"),
    (f"keys:\n  {KEY}: {{team: t}}\n", f":10: keys{SHOWN}: needs a tier (or set [gateway] default_tier)"),
    (f"keys:\n  {KEY}: {{tier: pro, teem: t}}\n", f":10: keys{SHOWN}.teem: unknown field; did you mean 'team'?"),
    (f"keys:\n  {KEY}: {{tier: pro, team: [t]}}\n", f":10: keys{SHOWN}.team: must be a team name"),
    # A key indented one level too deep: both masked.
    (
        f"keys:\n  {KEY}:\n    {OTHER}: pro\n",
        f":11: keys{SHOWN}[{OTHER_SHOWN[1:-1]}]: unknown field (expected one of: tier, team)",
    ),
    (f"keys:\n  {KEY}: pro\n  {KEY}: pro\n", f":11: keys{SHOWN}: given twice (keep one)"),
    (f"keys:\n  <<: {{{KEY}: pro}}\n  {KEY}: pro\n", f":11: keys{SHOWN}: given twice (keep one)"),
    (f"keys:\n  <<: [{{{KEY}: pro}}, {{{KEY}: pro}}]\n", f":10: keys{SHOWN}: given twice (keep one)"),
    (f"keys:\n  {KEY}: {{tier: pro, team: t, team: t}}\n", f":10: keys{SHOWN}.team: given twice (keep one)"),
    (f"    {KEY}: pro\n", f":9: teams.t{SHOWN}: unknown field (expected one of: org, "),
    (f"top:{KEY}: pro\n", f":1: {SHOWN}: unknown section (expected one of: upstream, "),
]


def _text(base, extra):
    return extra.removeprefix("top:") + base if extra.startswith("top:") else base + extra


@pytest.mark.parametrize(("extra", "expected"), TOML_CASES)
def test_toml_errors_name_a_key_masked_at_its_line(tmp_path, extra, expected):
    message = error_of(tmp_path, _text(TOML, extra), "gw.toml")
    assert expected in message, message
    assert_masked(message, KEY, OTHER)


@pytest.mark.parametrize(("extra", "expected"), YAML_CASES)
def test_yaml_errors_name_a_key_masked_at_its_line(tmp_path, extra, expected):
    pytest.importorskip("yaml")
    message = error_of(tmp_path, _text(YAML, extra), "gw.yaml")
    assert expected in message, message
    assert_masked(message, KEY, OTHER)


def test_yaml_names_that_are_no_text_are_masked_too(tmp_path):
    """A YAML key that is a number, or holds a lone surrogate, is refused without being
    printed (a number of 20 digits is a key someone forgot to quote)."""
    pytest.importorskip("yaml")
    message = error_of(tmp_path, YAML + "keys:\n  12345678901234567890: pro\n", "gw.yaml")
    assert ':10: keys["1234…90"]: names must be strings (quote it), got an integer' in message, message
    assert "56789012345678" not in message
    message = error_of(tmp_path, YAML + 'keys:\n  "sk-live-\\ud800abcdef123456": pro\n', "gw.yaml")
    assert ':10: keys["sk-l…56"]: the name must be text' in message, message
    assert "abcdef1234" not in message


@pytest.mark.parametrize("name", ["gw.toml", "gw.yaml"])
def test_a_short_key_shows_nothing_of_itself(tmp_path, name):
    if name.endswith("yaml"):
        pytest.importorskip("yaml")
    for key in ("k", "sk-short-1", "sk-15-chars-abc"):
        extra = f'[keys]\n"{key}" = "gold"\n' if name.endswith("toml") else f"keys:\n  {key}: gold\n"
        message = error_of(tmp_path, (TOML if name.endswith("toml") else YAML) + extra, name)
        assert f"{8 if name.endswith('toml') else 10}: keys[…]: tier 'gold' is not defined" in message, message
        assert len(key) == 1 or key[1:] not in message


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("sk-live-abcdefghij12", '"sk-l…12"'),
        ("x" * 15, "…"),
        ("x" * 16, '"xxxx…xx"'),
        ("a" * 5000, '"aaaa…aa"'),
        ('sk-"abcdefghijklm12', "…"),  # a quote would end the quoted form
        ("sk-\\abcdefghijklm12", "…"),
        ("sk-\nabcdefghijklm12", "…"),  # a line break would forge a log line
        ("sk-éabcdefghijklm12", "…"),
        ("sk-live-abcdefghij\t2", "…"),
        ("sk-live-abc\ndefghij12", '"sk-l…12"'),  # what is hidden may be anything
    ],
)
def test_the_mask(key, shown):
    assert mask(key) == shown
    assert mask(key) == mask(key[:4] + "y" * (len(key) - 6) + key[-2:]), "only the shown characters count"


def test_a_failed_reload_logs_the_key_masked(tmp_path, caplog):
    """A SIGHUP reload that fails logs its error: the operator's logs get the mask."""
    path = tmp_path / "gw.toml"
    path.write_text(TOML + f'[keys]\n"{KEY}" = "pro"\n')
    app = build_app(str(path))
    path.write_text(TOML + f'[keys]\n"{KEY}" = "pro"\n"{OTHER}" = {{ tier = "pro", team = "nope" }}\n')
    with caplog.at_level(logging.ERROR, logger="nexus_limits.gateway"):
        assert not app.reload()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"gw.toml:9: keys{OTHER_SHOWN}.team: team 'nope' is not defined" in logged, logged
    assert_masked(logged, KEY, OTHER)
    assert app.cfg.keys == {KEY: "pro"}, "the running config is kept"


def test_the_check_command_prints_the_key_masked(tmp_path):
    path = tmp_path / "gw.yaml"
    pytest.importorskip("yaml")
    path.write_text(YAML + f"keys:\n  {KEY}: gold\n")
    run = subprocess.run(
        [sys.executable, "-m", "nexus_limits.cli", "gateway", "--config", str(path), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert f"gw.yaml:10: keys{SHOWN}: tier 'gold' is not defined" in run.stderr, run.stderr
    assert_masked(run.stdout + run.stderr, KEY)


# Errors about anything but a key read as before the masking, word for word.
UNCHANGED = [
    ("gw.toml", TOML + '[tiers.x]\nreqests = "1/s"\n', ":8: tiers.x.reqests: unknown field; did you mean 'requests'?"),
    ("gw.toml", TOML + "[tiers.x]\nbogus = 1\n", ":8: tiers.x.bogus: unknown field (expected one of: requests, "),
    ("gw.toml", TOML + "[servr]\n", ":7: servr: unknown section; did you mean 'server'?"),
    ("gw.toml", TOML + "[upstream2]\n", ":7: upstream2: unknown section; did you mean 'upstream'?"),
    ("gw.toml", TOML + '[tiers.pro]\ntokens = "1/s"\n', ":7: tiers.pro: given twice (keep one)"),
    ("gw.toml", TOML + '[teams.t]\nrequests = "1/s"\n', ":7: teams.t: given twice (keep one)"),
    ("gw.toml", TOML + '[tiers.x]\nqueue = { a = 1, a = 2 }\n', ":8: invalid TOML: Duplicate inline table key 'a' (at line 8"),
    ("gw.toml", TOML + '[tiers.x]\nqueue = { a = 1 }\nqueue.b = 2\n', ":9: invalid TOML: Cannot mutate immutable namespace ('tiers', 'x', 'queue')"),
    ("gw.toml", TOML + '[tiers.x]\nrequests = "1/s\n', ":8: invalid TOML: Illegal character '\\n' (at line 8"),
    ("gw.toml", TOML + '[tiers.x]\nrequests = "1/s"\nteam = "t"\n', ":9: tiers.x.team: unknown field (expected one of: requests, "),
    ("gw.yaml", YAML + "    requests: 2/s\n", ":9: teams.t.requests: given twice (keep one)"),
    ("gw.yaml", YAML + "  123: {requests: 1/s}\n", ":9: teams.123: names must be strings, got 123"),
    ("gw.yaml", YAML + "  t2:\n    bogus: 1\n", ":10: teams.t2.bogus: unknown field"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "text", "expected"), UNCHANGED)
def test_errors_about_anything_else_are_unchanged(tmp_path, name, text, expected):
    if name.endswith("yaml"):
        pytest.importorskip("yaml")
    message = error_of(tmp_path, text, name)
    assert message.startswith(expected), message
    assert "…" not in message
