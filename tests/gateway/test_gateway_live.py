"""The gateway's live control: reload on SIGHUP and on file change keeping counters,
Prometheus metrics scraped over HTTP, admin endpoints, YAML configs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import fake_llm
from support.servers import ASGIServer, free_port

from nexus_limits.gateway import ConfigError, build_app, load_config

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}
FREE = {"authorization": "Bearer sk-free"}

TOML = """
[server]
port = {port}

[upstream]
url = "{url}"

[gateway]
key = "bearer"
reload = "{reload}"
reload_interval = 0.1
{admin}

[tiers.free]
requests = "{free}"
tokens = "100000/hour"
{shadow}

[tiers.pro]
requests = "100/minute"

[keys]
"sk-free" = "free"
"sk-pro" = "pro"
"""


def config(tmp_path, url, free="2/minute", reload="sighup", port=0, admin="", shadow=""):
    path = tmp_path / "gateway.toml"
    path.write_text(
        TOML.format(url=url, free=free, reload=reload, port=port or free_port(), admin=admin, shadow=shadow)
    )
    return path


def scrape(http) -> dict:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def upstream():
    with ASGIServer(fake_llm.app) as server:
        yield server


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_sighup_reload_keeps_counters_in_a_real_gateway_process(tmp_path, upstream):
    port = free_port()
    path = config(tmp_path, upstream.url, free="2/minute", port=port)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_limits.cli", "gateway", "--config", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            def up():
                try:
                    return http.get("/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(up, 30)
            codes = [http.post("/v1/chat/completions", json=CHAT, headers=FREE).status_code for _ in range(3)]
            assert codes == [200, 200, 429]
            # The customer is upgraded: 5/minute. The 2 requests already made still count.
            config(tmp_path, upstream.url, free="5/minute", port=port)
            os.kill(proc.pid, signal.SIGHUP)
            wait_for(lambda: scrape(http).get(("nexus_limits_config_reloads_total", (("result", "ok"),))) == 1)
            codes = [http.post("/v1/chat/completions", json=CHAT, headers=FREE).status_code for _ in range(4)]
            assert codes == [200, 200, 200, 429], "3 more fit in 5/minute, not 5: the counter was kept"
            got = scrape(http)
            labels = (("limiter", "tier-free"), ("route", "/v1/chat/completions"), ("tier", "free"))
            assert got[("nexus_limits_requests_total", (("decision", "allowed"), *labels))] == 5
            assert got[("nexus_limits_requests_total", (("decision", "denied"), *labels))] == 2
            assert got[("nexus_limits_check_seconds_count", labels)] == 7
            assert got[("nexus_limits_tokens_total", (("kind", "settled"), ("limiter", "tier-free")))] == 5 * 50
            part = (("limit", "requests"), ("limiter", "tier-free"))
            assert got[("nexus_limits_checks_total", (("decision", "allowed"), *part))] == 5
            assert got[("nexus_limits_keys", part)] == 1
            # A broken config is refused and the running one stays.
            path.write_text("[tiers.free]\nrequests = 'lots'\n")
            os.kill(proc.pid, signal.SIGHUP)
            wait_for(lambda: scrape(http).get(("nexus_limits_config_reloads_total", (("result", "error"),))) == 1)
            assert http.post("/v1/chat/completions", json=CHAT, headers=FREE).status_code == 429
            assert http.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-pro"}).is_success
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert b"config reload failed" in out


def test_file_watch_reload_and_admin_endpoints(tmp_path, upstream, monkeypatch):
    monkeypatch.setenv("NLGW_ADMIN", "s3cret")
    path = config(tmp_path, upstream.url, free="3/minute", reload="watch", admin='admin_token_env = "NLGW_ADMIN"')
    app = build_app(str(path))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        assert all(http.post("/v1/chat/completions", json=CHAT, headers=FREE).is_success for _ in range(2))
        admin = {"authorization": "Bearer s3cret"}
        assert http.get("/_nexus/keys/sk-free").status_code == 403
        assert http.get("/_nexus/keys/sk-free", headers={"authorization": "Bearer wrong"}).status_code == 403
        doc = http.get("/_nexus/keys/sk-free", headers=admin).json()
        assert doc["tier"] == "free"
        assert doc["limits"]["requests"]["used"] == 2 and doc["limits"]["requests"]["limit"] == 3
        assert 90 <= doc["limits"]["tokens"]["used"] <= 100, "100 tokens, refilling at 100,000/hour"
        top = http.get("/_nexus/top?tier=free&n=5", headers=admin).json()
        assert top["limit"] == "tokens" and top["top"][0]["key"] == "sk-free" and 90 <= top["top"][0]["used"] <= 100
        assert http.get("/_nexus/top?tier=nope", headers=admin).status_code == 400
        assert http.get("/_nexus/top?tier=free&n=x", headers=admin).status_code == 400
        assert http.get("/_nexus/other", headers=admin).status_code == 404
        # Edit the file: the watcher picks it up; the shadow tier admits past its limit.
        time.sleep(0.05)
        config(
            tmp_path,
            upstream.url,
            free="3/minute",
            reload="watch",
            admin='admin_token_env = "NLGW_ADMIN"',
            shadow="shadow = true",
        )
        wait_for(lambda: app.tiers["free"].limiter.shadow)
        codes = [http.post("/v1/chat/completions", json=CHAT, headers=FREE).status_code for _ in range(3)]
        assert codes == [200, 200, 200], "shadow mode: decided and counted, never denied"
        got = scrape(http)
        labels = (("limiter", "tier-free"), ("route", "/v1/chat/completions"), ("tier", "free"))
        assert got[("nexus_limits_requests_total", (("decision", "shadow_denied"), *labels))] == 2
        assert got[("nexus_limits_config_reloads_total", (("result", "ok"),))] >= 1


def test_reload_changes_tiers_and_keys(tmp_path, upstream):
    path = tmp_path / "gw.toml"
    base = f"""
        [upstream]
        url = "{upstream.url}"
        [gateway]
        reload = "off"
        metrics_path = false
        [tiers.free]
        requests = "2/minute"
        spend = "1.00/day"
        [keys]
        "sk-free" = "free"
    """
    path.write_text(textwrap.dedent(base))
    app = build_app(str(path))
    limiter = app.tiers["free"].limiter
    spend = app.tiers["free"].spend
    assert limiter.reserve("sk-free", 0).allowed
    # New quotas, a new tier, a key moved, the spend budget raised, an upstream change
    # (which needs a restart and is kept as it was).
    updated = """
        [upstream]
        url = "http://127.0.0.2:1"
        [gateway]
        reload = "off"
        metrics_path = false
        [tiers.free]
        requests = "4/minute"
        spend = "2.00/day"
        [tiers.pro]
        requests = "100/minute"
        [keys]
        "sk-free" = "free"
        "sk-pro" = "pro"
    """
    path.write_text(textwrap.dedent(updated))
    assert app.reload()
    assert app.tiers["free"].limiter is limiter and app.tiers["free"].spend is spend
    assert limiter.requests.count == 4 and spend.budget.count == 2_000_000
    assert app.cfg.upstream_url == upstream.url, "the upstream needs a restart"
    assert "pro" in app.tiers and app.cfg.keys["sk-pro"] == "pro"
    # A tier whose set of limits changes is rebuilt.
    path.write_text(textwrap.dedent(base).replace('requests = "2/minute"', 'tokens = "100/minute"'))
    assert app.reload()
    assert app.tiers["free"].limiter is not limiter and "pro" not in app.tiers
    # A broken file changes nothing.
    path.write_text("not toml [")
    assert not app.reload()
    assert app.tiers["free"].limiter.tokens.count == 100


def test_yaml_config(tmp_path, upstream):
    pytest.importorskip("yaml")
    path = tmp_path / "gateway.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            upstream:
              url: "{upstream.url}"
            gateway:
              key: bearer
            tiers:
              free:
                requests: 2/minute
                tokens: 100000/hour
            keys:
              sk-free: free
            """
        )
    )
    cfg = load_config(str(path))
    assert cfg.tiers["free"].requests == "2/minute" and cfg.keys == {"sk-free": "free"}
    app = build_app(str(path))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        codes = [http.post("/v1/chat/completions", json=CHAT, headers=FREE).status_code for _ in range(3)]
        assert codes == [200, 200, 429]


@pytest.mark.parametrize(
    "text, where",
    [
        ("upstream:\n  url: http://x\ntiers:\n  free:\n    requests: lots\n", ":5: tiers.free.requests"),
        ("upstream:\n  url: http://x\ntiers:\n  free:\n    bogus: 1\n", ":5: tiers.free.bogus: unknown field"),
        ("upstream:\n  url: http://x\nextra: 1\ntiers: {}\n", ":3: extra: unknown section"),
        ("upstream:\n  url: [\n", ":3: invalid YAML"),
        ("- a list\n", ":1: the config must be a mapping"),
        (
            "upstream:\n  url: http://x\ngateway:\n  reload: often\ntiers:\n  t:\n    requests: 1/s\n",
            ":4: gateway.reload",
        ),
    ],
)
def test_yaml_errors_name_file_line_and_field(tmp_path, text, where):
    pytest.importorskip("yaml")
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(str(path)) and where in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "extra, where",
    [
        ("[gateway]\nreload_interval = 0\n", "gateway.reload_interval: must be above 0"),
        ('[gateway]\nmetrics_path = "metrics"\n', "gateway.metrics_path: must be a path"),
        ('[gateway]\nadmin_token_env = "NLGW_UNSET_VAR"\n', "the environment variable NLGW_UNSET_VAR is not set"),
        ("[weird]\n", "weird: unknown section"),
        (
            '[backend]\ntype = "redis"\nurl = "redis://127.0.0.1:1"\n[tiers.s]\nrequests = "1/s"\nshadow = true\n',
            "shadow mode needs",
        ),
    ],
)
def test_new_toml_fields_are_checked(tmp_path, extra, where):
    path = tmp_path / "gw.toml"
    path.write_text('[upstream]\nurl = "http://127.0.0.1:1"\n[tiers.t]\nrequests = "1/s"\n' + extra)
    with pytest.raises(ConfigError, match="gw.toml:[0-9]+: ") as info:
        load_config(str(path))
    assert where in str(info.value)
