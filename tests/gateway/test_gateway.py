"""The reference gateway end to end: uvicorn serving it, a fake provider upstream."""

from __future__ import annotations

import textwrap
import time

import httpx
import pytest
from support import fake_llm
from support.servers import ASGIServer, free_port

from nexus_limits import cli
from nexus_limits.gateway import ConfigError, build_app, load_config

CONFIG = """
[upstream]
url = "{url}"
timeout = 30

[gateway]
key = "bearer"
{default}

[tiers.free]
requests = "3/minute"
tokens = "2000/hour"
concurrency = 1
default_output_tokens = 100

[tiers.pro]
requests = "100/minute"
tokens = "100000/hour"

[keys]
"sk-free" = "free"
"sk-pro" = "pro"
"""

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}


def write(tmp_path, url, default=""):
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG.format(url=url, default=default))
    return str(path)


@pytest.fixture
def upstream():
    with ASGIServer(fake_llm.app) as server:
        yield server


def remaining(app, tier, key):
    probe = app.tiers[tier].limiter.reserve(key, 0)
    left = probe.tokens.remaining
    probe.cancel()
    return left


def test_limits_per_tier_end_to_end(tmp_path, upstream):
    app = build_app(write(tmp_path, upstream.url))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=30) as http:
        free = {"authorization": "Bearer sk-free"}
        statuses = [http.post("/v1/chat/completions", json=CHAT, headers=free) for _ in range(4)]
        assert [r.status_code for r in statuses] == [200, 200, 200, 429]
        assert statuses[0].json()["usage"]["total_tokens"] == 50
        assert statuses[0].headers["x-ratelimit-limit-requests"] == "3"
        # Refused in the provider's error format (what the official SDKs read).
        assert statuses[3].json()["error"]["code"] == "rate_limit_exceeded"
        assert int(statuses[3].headers["retry-after"]) >= 1
        pro = {"authorization": "Bearer sk-pro"}
        assert all(http.post("/v1/chat/completions", json=CHAT, headers=pro).status_code == 200 for _ in range(5))
        assert (
            http.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer nobody"}).status_code == 401
        )
        assert http.get("/healthz").text == "ok"
        # Not an LLM path: proxied and charged one request, no tokens.
        other = http.post("/v1/other", json=CHAT, headers=pro)
        assert other.status_code == 200 and other.headers["x-ratelimit-remaining-requests"] == "94"
    assert remaining(app, "free", "sk-free") == 2000 - 3 * 50


def test_streams_settle_and_disconnects_release(tmp_path, upstream):
    app = build_app(write(tmp_path, upstream.url, default='default_tier = "free"'))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=30) as http:
        auth = {"authorization": "Bearer someone-new"}
        with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth) as r:
            text = b"".join(r.iter_raw())
        # The usage chunk the gateway asked for is read, not passed to a client that
        # did not ask for it.
        assert b"[DONE]" in text and b"total_tokens" not in text
        # The budget settles right after the last byte is sent: wait for it.
        deadline = time.monotonic() + 5
        while remaining(app, "free", "someone-new") != 2000 - 50 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert remaining(app, "free", "someone-new") == 2000 - 50, "streamed usage settled the budget"
        with http.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "model": "slow", "stream": True}, headers=auth
        ) as r:
            next(r.iter_raw())
        left_at = time.monotonic()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = app.tiers["free"].limiter.reserve("someone-new", 0)
            if probe.allowed:
                probe.cancel()
                break
            time.sleep(0.05)
        else:
            pytest.fail("the lease was not released after the client went away")
        assert time.monotonic() - left_at < 3, "the stream was cut when the client left, not when it ended"
        body = {"model": "claude-x", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
        r = http.post("/v1/messages", json=body, headers={"authorization": "Bearer sk-pro"})
        assert r.status_code == 200 and r.json()["usage"]["output_tokens"] == 12


def test_upstream_down_is_a_502(tmp_path):
    app = build_app(write(tmp_path, f"http://127.0.0.1:{free_port()}"))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url) as http:
        r = http.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-pro"})
        assert r.status_code == 502 and r.json()["title"] == "Bad Gateway"
    assert remaining(app, "pro", "sk-pro") == 100000, "the failed call was refunded"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[upstream]\nurl = 5\n[tiers.a]\nrequests = '1/s'\n", ":2: upstream.url: must be a URL string"),
        ("[upstream]\nurl = 'ftp://x'\n[tiers.a]\nrequests = '1/s'\n", ":2: upstream.url: must be an http"),
        ("[tiers.a]\nrequests = '1/s'\n", ":1: [upstream] is missing"),
        (
            "[upstream]\nurl = 'http://x'\n[tiers.a]\n\nrequests = '10/fortnight'\n",
            ':5: tiers.a.requests: invalid rate "10/fortnight"',
        ),
        ("[upstream]\nurl = 'http://x'\n[tiers.a]\nrequest = '1/s'\n", ":4: tiers.a.request: unknown field"),
        ("[upstream]\nurl = 'http://x'\n[tiers.a]\nconcurrency = 0\n", ":4: tiers.a.concurrency: must be at least 1"),
        ("[upstream]\nurl = 'http://x'\n[tiers.a]\n", ":3: tiers.a: set at least one of"),
        ("[upstream]\nurl = 'http://x'\n[tiers]\n", ":3: tiers: define at least one tier"),
        (
            "[upstream]\nurl = 'http://x'\n[tiers.a]\ntokens = '1/s'\n[keys]\nk = 'gold'\n",
            ":6: keys[…]: tier 'gold' is not defined",
        ),
        (
            "[upstream]\nurl = 'http://x'\n[gateway]\ndefault_tier = 'b'\n[tiers.a]\ntokens = '1/s'\n",
            ":4: gateway.default_tier: 'b' is not a tier",
        ),
        (
            "[upstream]\nurl = 'http://x'\n[backend]\ntype = 'redis'\n[tiers.a]\ntokens = '1/s'\n",
            ":3: backend.url: must be a redis:// URL",
        ),
        (
            "[upstream]\nurl = 'http://x'\n[server]\nport = 70000\n[tiers.a]\ntokens = '1/s'\n",
            ":4: server.port: must be from 1 to 65535",
        ),
        (
            "[upstream]\nurl = 'http://x'\napi_key_env = 'NL_SURELY_UNSET'\n[tiers.a]\ntokens = '1/s'\n",
            ":3: upstream.api_key_env: the environment variable NL_SURELY_UNSET is not set",
        ),
        (
            "[upstream]\nurl = 'http://x'\n[tiers.a]\ndaily_tokens = 0\n",
            ":4: tiers.a.daily_tokens: daily_tokens must be at least 1",
        ),
        ("[upstream\nurl = 'x'\n", "line 1"),
    ],
)
def test_config_errors_name_file_line_and_field(tmp_path, text, where):
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value).startswith(str(path)) and where in str(err.value), str(err.value)


def test_cli_checks_configs(tmp_path, capsys):
    assert cli.main(["gateway", "--config", "examples/gateway.toml", "--check"]) == 0
    assert "2 tiers, 2 keys" in capsys.readouterr().out
    assert cli.main(["gateway", "--config", str(tmp_path / "missing.toml"), "--check"]) == 2
    assert "cannot read the config" in capsys.readouterr().err


def test_upstream_api_key_replaces_the_clients(tmp_path, upstream, monkeypatch):
    monkeypatch.setenv("NL_TEST_UPSTREAM_KEY", "upstream-secret")
    path = tmp_path / "gw.toml"
    path.write_text(
        CONFIG.format(url=upstream.url, default="").replace(
            "timeout = 30", 'timeout = 30\napi_key_env = "NL_TEST_UPSTREAM_KEY"'
        )
    )
    cfg = load_config(str(path))
    assert cfg.upstream_api_key == "upstream-secret"
    app = build_app(str(path))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url) as http:
        assert (
            http.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-pro"}).status_code == 200
        )


def test_gateway_on_redis(tmp_path, upstream, redis_server):
    path = tmp_path / "gw.toml"
    path.write_text(
        CONFIG.format(url=upstream.url, default="")
        + f'\n[backend]\ntype = "redis"\nurl = "redis://127.0.0.1:{redis_server.port}/0"\nprefix = "gwtest"\non_error = "deny"\n'
    )
    app = build_app(str(path))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url) as http:
        free = {"authorization": "Bearer sk-free"}
        assert [http.post("/v1/chat/completions", json=CHAT, headers=free).status_code for _ in range(4)] == [
            200,
            200,
            200,
            429,
        ]
    import redis

    client = redis.Redis(port=redis_server.port)
    keys = client.keys("gwtest:*")
    client.close()
    assert keys and all(b"{ssk-free}" in k for k in keys), "the budget lives in Redis"


def test_gateway_spend_and_prices(tmp_path, upstream):
    path = tmp_path / "gw.toml"
    text = CONFIG.format(url=upstream.url, default="").replace(
        '[gateway]\nkey = "bearer"', '[gateway]\nkey = "bearer"\nlearn_output = true'
    )
    text = text.replace(
        '[tiers.pro]\nrequests = "100/minute"', '[tiers.pro]\nspend = "0.01/day"\nrequests = "100/minute"'
    )
    text += '\n[prices."gpt-4o"]\ninput = "5"\noutput = "20"\n'
    path.write_text(text)
    app = build_app(str(path))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url) as http:
        r = http.post(
            "/v1/chat/completions", json={**CHAT, "max_tokens": 10}, headers={"authorization": "Bearer sk-pro"}
        )
        assert r.status_code == 200 and r.headers["x-budget-limit"] == "0.01"
    spend = app.tiers["pro"].spend

    def left():
        probe = spend.reserve("sk-pro", "gpt-4o", 0, 0)
        probe.cancel()
        return probe.decision.remaining

    deadline = time.monotonic() + 5
    while left() != 10_000 - (30 * 5 + 20 * 20) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert left() == 10_000 - (30 * 5 + 20 * 20), "priced with the config's override"


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ('[tiers.z]\nspend = "lots"\n', "tiers.z.spend: invalid budget"),
        ('[prices."m"]\ninput = "1"\n', "prices.m: price of 'm' must have 'input' and 'output'"),
        ('[prices."m"]\ninput = "1"\noutput = "2"\nextra = 1\n', "prices.m.extra: unknown field"),
        ("[prices]\nm = 5\n", "prices.m: must be a table"),
    ],
)
def test_spend_config_errors(tmp_path, extra, where):
    path = tmp_path / "bad.toml"
    path.write_text("[upstream]\nurl = 'http://x'\n[tiers.a]\ntokens = '1/s'\n" + extra)
    with pytest.raises(ConfigError, match=where.replace("(", "\\(").replace(".", "\\.")):
        load_config(str(path))
