"""Orgs, teams and priority classes in the gateway: a key of a team is charged at org >
team > key in one step; classes share every quota. Real uvicorn (and a real gateway
process for SIGHUP), the fake LLM upstream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support import fake_llm
from support.servers import ASGIServer, free_port

from nexus_limits.gateway import ConfigError, build_app, load_config

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10}
ADMIN = {"authorization": "Bearer team-admin"}

BASE = """
[server]
port = {port}

[upstream]
url = "{url}"

[gateway]
admin_token_env = "NL_TEAMS_ADMIN"
{gateway}

[tiers.pro]
requests = "100/minute"
tokens = "100000/minute"
{tier}
"""


def auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def upstream():
    with ASGIServer(fake_llm.app) as server:
        yield server


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("NL_TEAMS_ADMIN", "team-admin")


def write(tmp_path, url, extra, gateway="", tier="", port=0):
    path = tmp_path / "gw.toml"
    path.write_text(BASE.format(url=url, gateway=gateway, tier=tier, port=port or free_port()) + extra)
    return path


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


TEAM = """
[orgs.acme]
requests = "1000/minute"

[teams.search]
org = "acme"
requests = "10/minute"

[keys]
"sk-1" = { tier = "pro", team = "search" }
"sk-2" = { tier = "pro", team = "search" }
"sk-solo" = "pro"
"""


def test_two_keys_of_a_team_share_its_quota_exactly_under_concurrency(tmp_path, upstream):
    app = build_app(str(write(tmp_path, upstream.url, TEAM)))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        keys = ["sk-1", "sk-2"] * 12
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda k: http.post("/v1/chat/completions", json=CHAT, headers=auth(k)), keys))
        assert sorted(r.status_code for r in answers).count(200) == 10, [r.status_code for r in answers]
        refused = [r for r in answers if r.status_code == 429]
        assert len(refused) == 14
        for r in refused:
            # The refusing level's policy first in the headers, named in the body.
            assert r.headers["ratelimit-policy"].startswith('"team.requests";q=10;w=60'), r.headers
            assert r.headers["x-nexus-limit-policy"] == "team.requests"
            assert "10/minute of team search" in r.json()["error"]["message"]
            assert 1 <= int(r.headers["retry-after"]) <= 7
        # Both keys were served: the quota is the team's, not each key's.
        served = {k for k, r in zip(keys, answers) if r.status_code == 200}
        assert served == {"sk-1", "sk-2"}
        # A key outside the team is not charged there.
        assert http.post("/v1/chat/completions", json=CHAT, headers=auth("sk-solo")).status_code == 200
        doc = http.get("/_nexus/keys/sk-2", headers=ADMIN).json()
    assert doc["team"] == "search" and doc["org"] == "acme" and doc["tier"] == "pro"
    assert doc["limits"]["team"]["requests"]["remaining"] == 0
    assert doc["limits"]["org"]["requests"]["limit"] == 1000
    assert "tokens" not in doc["limits"]["org"], "quotas no org was given are not shown"


def test_an_org_quota_refuses_across_teams(tmp_path, upstream):
    extra = """
[orgs.acme]
requests = "4/minute"

[teams.a]
org = "acme"
[teams.b]
org = "acme"
requests = "100/minute"

[keys]
"sk-a" = { tier = "pro", team = "a" }
"sk-b" = { tier = "pro", team = "b" }
"""
    app = build_app(str(write(tmp_path, upstream.url, extra)))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        codes = [http.get("/v1/models", headers=auth(k)).status_code for k in ("sk-a", "sk-b") * 3]
        assert codes == [200, 200, 200, 200, 429, 429]
        r = http.get("/v1/models", headers=auth("sk-b"))
        assert r.status_code == 429 and r.headers["x-nexus-limit-policy"] == "org.requests"
        assert "request limit 4/minute of org acme reached" in r.json()["detail"], r.text


def test_tokens_settle_at_every_level(tmp_path, upstream):
    extra = """
[orgs.acme]
tokens = "100000/day"

[teams.search]
org = "acme"
tokens = "50000/day"

[keys]
"sk-1" = { tier = "pro", team = "search" }
"""
    app = build_app(str(write(tmp_path, upstream.url, extra, tier="")))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        r = http.post("/v1/chat/completions", json=CHAT, headers=auth("sk-1"))
        assert r.status_code == 200
        assert '"team.tokens";q=50000;w=86400' in r.headers["ratelimit-policy"]

        def used():
            limits = http.get("/_nexus/keys/sk-1", headers=ADMIN).json()["limits"]
            return limits["org"]["tokens"]["used"], limits["team"]["tokens"]["used"]

        # The fake upstream reports 50 tokens: the estimate is replaced by them at every level.
        wait_for(lambda: used() == (50, 50))
        r = http.post("/v1/chat/completions", json={**CHAT, "model": "broken"}, headers=auth("sk-1"))
        assert r.status_code == 500
        wait_for(lambda: used() == (50, 50))  # an upstream error refunds every level


CLASSES = """
[classes]
interactive = 1.0
batch = 0.7

[[routes]]
path = "/v1/batches"
class = "batch"

[teams.search]
requests = "10/minute"

[tiers.small]
requests = "10/minute"

[keys]
"sk-1" = { tier = "pro", team = "search" }
"sk-solo" = "small"
"""


def test_batch_is_refused_at_its_share_while_interactive_is_served(tmp_path, upstream):
    path = write(
        tmp_path, upstream.url, CLASSES, gateway='class_header = "x-nexus-priority"', tier='class = "interactive"'
    )
    app = build_app(str(path))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        # A route's class: batch may use 70% of the team's 10.
        batch = [http.post("/v1/batches", json={}, headers=auth("sk-1")) for _ in range(10)]
        assert [r.status_code for r in batch].count(200) == 7
        assert batch[-1].headers["x-nexus-limit-policy"] == "team.requests"
        # The tier's class: interactive takes the reserve.
        codes = [http.get("/v1/models", headers=auth("sk-1")).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        # A key with no team: its tier's quota is shared by the classes too (header).
        batch = {"x-nexus-priority": "batch", **auth("sk-solo")}
        assert [http.get("/v1/models", headers=batch).status_code for _ in range(8)].count(200) == 7
        # No header, no route, a tier with no class: the smallest share (batch) by default.
        assert http.get("/v1/models", headers=auth("sk-solo")).status_code == 429
        top = {"x-nexus-priority": "interactive", **auth("sk-solo")}
        assert [http.get("/v1/models", headers=top).status_code for _ in range(4)] == [200, 200, 200, 429]
    stats = app.team_tree.limiter.stats()
    assert stats["class.batch"]["allowed"] == 7 and stats["class.batch"]["denied"] == 3
    assert stats["class.interactive"]["allowed"] == 3
    assert "nexus_limits_checks_total" in app.metrics.render().decode()


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ([("x-nexus-priority", "vip")], "must be one of: interactive, batch; got 'vip'"),
        ([("x-nexus-priority", "")], "must be one of: interactive, batch; got ''"),
        ([("x-nexus-priority", "Batch")], "got 'Batch'"),
        ([("x-nexus-priority", "batch"), ("x-nexus-priority", "batch")], "give the x-nexus-priority header once"),
        ([("X-Nexus-Priority", "batch"), ("x-nexus-priority", "interactive")], "given 2 times"),
        ([("x-nexus-priority", "b" * 10_000)], "longer than 64 bytes"),
        ([("x-nexus-priority", b"batch\xff")], "got 'batch\xff'"),
    ],
)
def test_a_class_header_that_is_not_one_known_class_is_a_400(tmp_path, upstream, headers, detail):
    path = write(tmp_path, upstream.url, CLASSES, gateway='class_header = "x-nexus-priority"')
    app = build_app(str(path))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        seen = len(fake_llm.SEEN)
        for key in ("sk-1", "sk-solo"):
            r = http.get("/v1/models", headers=[*auth(key).items(), *headers])
            assert r.status_code == 400 and detail in r.json()["detail"], r.text
        assert len(fake_llm.SEEN) == seen, "nothing was forwarded"
        # Nothing was charged: the whole quota is still there.
        codes = [http.get("/v1/models", headers=auth("sk-solo")).status_code for _ in range(8)]
        assert codes.count(200) == 7, "batch (the default) still has its whole share"


def test_sighup_applies_new_team_quotas_keeping_usage(tmp_path, upstream):
    port = free_port()
    extra = TEAM.replace('requests = "10/minute"', 'requests = "TEAM"')
    path = write(tmp_path, upstream.url, extra.replace("TEAM", "3/minute"), port=port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_limits.cli", "gateway", "--config", str(path)],
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
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
            codes = [http.get("/v1/models", headers=auth(k)).status_code for k in ("sk-1", "sk-2", "sk-1", "sk-2")]
            assert codes == [200, 200, 200, 429]
            write(tmp_path, upstream.url, extra.replace("TEAM", "5/minute"), port=port)
            os.kill(proc.pid, signal.SIGHUP)

            def reloaded():
                doc = http.get("/_nexus/keys/sk-1", headers=ADMIN).json()
                return doc["limits"]["team"]["requests"]["limit"] == 5

            wait_for(reloaded)
            codes = [http.get("/v1/models", headers=auth(k)).status_code for k in ("sk-2", "sk-1", "sk-2")]
            assert codes == [200, 200, 429], "2 more fit in 5/minute, not 5: the team's usage was kept"
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_reload_moves_a_key_between_teams(tmp_path, upstream):
    path = write(tmp_path, upstream.url, TEAM)
    app = build_app(str(path))
    tree = app.team_tree
    assert tree.limiter.route_of("sk-1").path == ("acme", "search", "sk-1")
    path.write_text(path.read_text().replace('"sk-2" = { tier = "pro", team = "search" }', '"sk-2" = "pro"'))
    assert app.reload()
    assert app.team_tree is tree, "the same hierarchy: usage kept"
    assert tree.limiter.route_of("sk-2") is None and "pro" in app.team_tiers
    path.write_text(path.read_text().replace('[orgs.acme]\nrequests = "1000/minute"', "[orgs.acme]\nconcurrency = 4"))
    assert app.reload()
    assert app.team_tree is not tree, "a level's kinds of quota changed: a new hierarchy"


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ('[teams.t]\norg = "nope"\n', ":17: teams.t.org: org 'nope' is not defined in [orgs]"),
        ('[keys]\nk = { tier = "pro", team = "nope" }\n', ":17: keys[…].team: team 'nope' is not defined"),
        ('[keys]\nk = { team = "t" }\n[teams.t]\n', ":17: keys[…]: needs a tier"),
        ('[keys]\nk = { tier = "pro", teem = "t" }\n', ":17: keys[…].teem: unknown field; did you mean 'team'?"),
        ('[teams.t]\nrequests = "lots"\n', ":17: teams.t.requests: invalid rate"),
        ("[teams.t]\nconcurrency = 0\n", ":17: teams.t.concurrency: must be at least 1"),
        ('[orgs.o]\nrequest = "1/s"\n', ":17: orgs.o.request: unknown field; did you mean 'requests'?"),
        ('[orgs.o]\nspend = "lots"\n', ":17: orgs.o.spend: invalid budget"),
        ("[orgs.o]\ntokens = 5\n", ":17: orgs.o.tokens: must be a rate"),
        ('[orgs.""]\n', "orgs: names must not be empty"),
        ("[classes]\nbatch = 0.7\n", ":16: classes: one class must have the whole quota"),
        ("[classes]\na = 1.0\nb = 0\n", ":18: classes.b: must be a share above 0 and at most 1"),
        ("[classes]\na = 1.0\nb = nan\n", ":18: classes.b: must be a share above 0"),
        ('[classes]\na = 1.0\nb = "0.5"\n', ":18: classes.b: must be a share of every quota"),
        ('[[routes]]\npath = "/v1/batches"\nclass = "batch"\n', ":18: routes[0].class: class 'batch' is not defined"),
        ('[classes]\na = 1.0\n[[routes]]\nclass = "a"\n', ":18: routes[0]: needs path"),
        ('[classes]\na = 1.0\n[[routes]]\npath = "v1"\nclass = "a"\n', ":19: routes[0].path: must be a path"),
        ('[classes]\na = 1.0\n[[routes]]\npath = "/a/../b"\nclass = "a"\n', ":19: routes[0].path: must"),
        ('[classes]\na = 1.0\n[routes]\npath = "/a"\n', ":18: routes: must be a list of tables"),
        ('[classes]\na = 1.0\n[tiers.x]\nrequests = "1/s"\nclass = "b"\n', ":20: tiers.x.class: class 'b' is not"),
        (
            '[classes]\na = 1.0\n[tiers.x]\nrequests = "1/s"\nqueue = "5s"\n',
            ":20: tiers.x.queue: queue is not available",
        ),
    ],
)
def test_team_and_class_config_errors(tmp_path, extra, where):
    path = write(tmp_path, "http://127.0.0.1:1", extra)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(str(path)) and where in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("gateway", "where"),
    [
        ('class_header = "x-prio"', "gateway.class_header: needs a [classes] table"),
        ('class_header = "x prio"', "gateway.class_header: must be a header name"),
        ('default_class = "x"', "gateway.default_class: class 'x' is not defined in [classes]"),
    ],
)
def test_class_options_of_the_gateway_table(tmp_path, gateway, where):
    path = write(tmp_path, "http://127.0.0.1:1", "", gateway=gateway)
    with pytest.raises(ConfigError, match=r"gw\.toml:\d+: " + where.replace("[", r"\[").replace("]", r"\]")):
        load_config(str(path))


def test_a_team_tier_refuses_queue_and_shadow(tmp_path):
    team = '[teams.t]\n[keys]\nk = { tier = "pro", team = "t" }\n'
    for option in ('queue = "5s"', "shadow = true"):
        path = write(tmp_path, "http://127.0.0.1:1", team, tier=option)
        with pytest.raises(ConfigError, match=r"tiers\.pro\.(queue|shadow): .* is not available for keys in a team"):
            load_config(str(path))
    redis = '[backend]\ntype = "redis"\nurl = "redis://127.0.0.1:1/0"\n'
    cfg = load_config(str(write(tmp_path, "http://127.0.0.1:1", redis + team)))
    assert cfg.backend == "redis" and cfg.key_teams == {"k": "t"}, "teams on Redis: nexus_limits.redis Hierarchy"


def test_plain_keys_keep_working_and_team_keys_keep_their_tier(tmp_path):
    path = write(tmp_path, "http://127.0.0.1:1", TEAM)
    cfg = load_config(str(path))
    assert cfg.keys == {"sk-1": "pro", "sk-2": "pro", "sk-solo": "pro"}
    assert cfg.key_teams == {"sk-1": "search", "sk-2": "search"}
    assert cfg.teams["search"].org == "acme" and cfg.teams["search"].quotas() == {"requests": "10/minute"}


def test_on_redis_two_gateways_share_a_team_quota_exactly(tmp_path, upstream, redis_server, redis_client):
    """[backend] type = "redis": the org > team > key hierarchy lives in Redis (one script
    per check), so two gateway processes share the team's quota exactly; the classes
    of a tier's one-level hierarchy too."""
    backend = f'[backend]\ntype = "redis"\nurl = "redis://127.0.0.1:{redis_server.port}/0"\nprefix = "gwteams"\n'
    path = write(tmp_path, upstream.url, TEAM + backend)
    first, second = build_app(str(path)), build_app(str(path))
    with ASGIServer(first, lifespan="on") as a, ASGIServer(second, lifespan="on") as b:
        with httpx.Client(timeout=10) as http:
            urls = [a.url, b.url] * 12

            def call(i):
                return http.post(f"{urls[i]}/v1/chat/completions", json=CHAT, headers=auth(("sk-1", "sk-2")[i % 2]))

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(call, range(len(urls))))
            assert [r.status_code for r in answers].count(200) == 10, [r.status_code for r in answers]
            refused = [r for r in answers if r.status_code == 429]
            assert all(r.headers["x-nexus-limit-policy"] == "team.requests" for r in refused)
            doc = http.get(f"{a.url}/_nexus/keys/sk-1", headers=ADMIN).json()
            assert doc["limits"]["team"]["requests"]["remaining"] == 0
    keys = [k.decode() for k in redis_client.keys("gwteams:*")]
    assert keys and all("{acme}" in k or "teams-" in k for k in keys), keys


def test_on_redis_reload_and_classes(tmp_path, upstream, redis_server, redis_client):
    backend = f'[backend]\ntype = "redis"\nurl = "redis://127.0.0.1:{redis_server.port}/0"\nprefix = "gwclasses"\n'
    # reload = "watch": the reload runs on the gateway's loop, its Redis writes in a thread.
    gateway = 'class_header = "x-nexus-priority"\nreload = "watch"\nreload_interval = 0.1'
    path = write(tmp_path, upstream.url, CLASSES + backend, gateway=gateway)
    app = build_app(str(path))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        batch = {"x-nexus-priority": "batch", **auth("sk-solo")}
        assert [http.get("/v1/models", headers=batch).status_code for _ in range(8)].count(200) == 7
        top = {"x-nexus-priority": "interactive", **auth("sk-solo")}
        assert [http.get("/v1/models", headers=top).status_code for _ in range(4)] == [200, 200, 200, 429]
        # The team's quota raised by a reload (in a worker thread), its usage kept.
        assert [http.post("/v1/batches", json={}, headers=auth("sk-1")).status_code for _ in range(8)].count(200) == 7
        path.write_text(
            path.read_text().replace('[teams.search]\nrequests = "10/minute"', '[teams.search]\nrequests = "20/minute"')
        )

        def raised():
            return http.get("/_nexus/keys/sk-1", headers=ADMIN).json()["limits"]["team"]["requests"]["limit"] == 20

        wait_for(raised)
        codes = [http.post("/v1/batches", json={}, headers=auth("sk-1")).status_code for _ in range(10)]
        assert codes.count(200) == 7, "batch may use 14 of 20, 7 of which were used before the reload"


def test_org_and_team_dollar_budgets_are_charged_at_every_level(tmp_path, upstream):
    extra = """
[orgs.acme]
spend = "0.002/day"

[teams.a]
org = "acme"
spend = "1.00/day"
[teams.b]
org = "acme"

[keys]
"sk-a" = { tier = "pro", team = "a" }
"sk-b" = { tier = "pro", team = "b" }

[prices."gpt-4o"]
input = "5"
output = "20"
"""
    app = build_app(str(write(tmp_path, upstream.url, extra)))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        r = http.post("/v1/chat/completions", json=CHAT, headers=auth("sk-a"))
        assert r.status_code == 200 and r.headers["x-budget-limit"] == "0.002", r.headers

        def spent():
            h = app.spend_tree.hierarchy
            return h.inspect(("acme",))["spend"]["used"], h.inspect(("acme", "a"))["spend"]["used"]

        # 30 tokens in at $5/1M and 20 out at $20/1M: 550 micro-dollars, at the org and the team.
        wait_for(lambda: spent() == (550, 550))
        codes = []
        for key in ("sk-b", "sk-a") * 4:
            codes.append(http.post("/v1/chat/completions", json=CHAT, headers=auth(key)))
            if codes[-1].status_code == 429:
                break
        refused = codes[-1]
        assert refused.status_code == 429, [c.status_code for c in codes]
        assert refused.headers["x-nexus-limit-policy"] == "org.spend"
        assert "spend budget 0.002/day of org acme" in refused.json()["error"]["message"]
        assert refused.json()["error"]["budget"] == "spend"
        # The org's budget, not a team's, refused: team b has none, team a has $1.
        assert spent()[0] >= 2000 - 550


def test_an_unknown_model_costs_no_level_anything(tmp_path, upstream):
    extra = '[orgs.acme]\nspend = "1.00/day"\n[teams.a]\norg = "acme"\n[keys]\n"sk-a" = { tier = "pro", team = "a" }\n'
    app = build_app(str(write(tmp_path, upstream.url, extra)))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        r = http.post("/v1/chat/completions", json={**CHAT, "model": "no-such-model"}, headers=auth("sk-a"))
        assert r.status_code == 400 and "no-such-model" in r.text
        key = app.team_tree.hierarchy.inspect(("acme", "a", "sk-a"))
    assert key["requests"]["used"] == 0, "the request reserved before pricing was refunded"


def test_the_examples_commented_team_and_class_blocks_load(tmp_path):
    import re
    from pathlib import Path

    from nexus_limits.gateway import config

    text = (Path(config.__file__).parent / "example.toml").read_text()
    for field in ("class_header", "default_class", "class", "org", "path"):
        assert f"\n# {field} = " in text, field
    block = text[text.index("# [orgs.acme]") : text.index("# Prices in dollars")]
    lines = [line[2:] for line in block.splitlines() if re.match(r"^# (\[|[a-z_]+ = )", line)]
    key = re.search(r'^# ("sk-demo-team" = .*?)\s+#', text, re.M).group(1)
    path = tmp_path / "gw.toml"
    path.write_text(
        '[upstream]\nurl = "http://127.0.0.1:1"\n[gateway]\nclass_header = "x-nexus-priority"\n'
        '[tiers.pro]\nrequests = "1/s"\nclass = "interactive"\n' + "\n".join(lines) + f"\n[keys]\n{key}\n"
    )
    cfg = load_config(str(path))
    assert cfg.key_teams == {"sk-demo-team": "search"} and cfg.teams["search"].org == "acme"
    assert cfg.classes == {"interactive": 1.0, "batch": 0.7} and cfg.routes == [("/v1/batches", "batch")]
    app = build_app(str(path))
    assert app.team_tree is not None and app.spend_tree is not None


async def slow_llm(scope, receive, send):
    """A fake upstream that takes 0.5 s to answer."""
    import asyncio

    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await asyncio.sleep(0.5)
    body = b'{"object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def test_a_team_concurrency_limit_holds_across_its_keys_and_frees_on_settle(tmp_path):
    extra = '[teams.t]\nconcurrency = 2\n[keys]\n"sk-1" = { tier = "pro", team = "t" }\n"sk-2" = { tier = "pro", team = "t" }\n'
    with ASGIServer(slow_llm) as up:
        app = build_app(str(write(tmp_path, up.url, extra)))
        with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
            with ThreadPoolExecutor(4) as pool:
                answers = list(
                    pool.map(
                        lambda k: http.post("/v1/chat/completions", json=CHAT, headers=auth(k)), ["sk-1", "sk-2"] * 2
                    )
                )
            assert sorted(r.status_code for r in answers) == [200, 200, 429, 429]
            refused = [r for r in answers if r.status_code == 429]
            assert all(r.headers["x-nexus-limit-policy"] == "team.concurrency" for r in refused)
            for r in refused:  # the body names the team whose places are taken, not "this key"
                message = r.json()["error"]["message"]
                assert "2 requests of team t are in flight" in message, message
                assert r.json()["error"]["policy"] == "team.concurrency", r.json()
            # Both places were given back when the calls settled.
            with ThreadPoolExecutor(2) as pool:
                again = list(
                    pool.map(lambda k: http.post("/v1/chat/completions", json=CHAT, headers=auth(k)), ["sk-1", "sk-2"])
                )
            assert [r.status_code for r in again] == [200, 200]
        assert app.team_tree.hierarchy.inspect(("", "t"))["concurrency"]["in_flight"] == 0


@pytest.mark.parametrize(
    ("path", "batch"),
    [
        ("/v1/batches", True),
        ("/v1/batches/b-1/cancel", True),
        ("/v1/batchesx", False),
        ("/v1/batches/", True),
        ("/V1/batches", False),
    ],
)
def test_a_route_class_matches_its_path_and_those_below(tmp_path, upstream, path, batch):
    app = build_app(str(write(tmp_path, upstream.url, CLASSES, tier='class = "interactive"')))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        codes = [http.post(path, json={}, headers=auth("sk-1")).status_code for _ in range(10)]
    assert codes.count(429) == (3 if batch else 0), codes


def test_yaml_teams_classes_and_routes(tmp_path):
    pytest.importorskip("yaml")
    text = """upstream:
  url: http://127.0.0.1:1
classes:
  interactive: 1.0
  batch: 0.7
routes:
  - path: /v1/batches
    class: batch
  - path: /v1/files
    class: bulk
teams:
  search:
    requests: 10/minute
tiers:
  pro:
    requests: 100/minute
keys:
  sk-1: {tier: pro, team: search}
"""
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"gw\.yaml:10: routes\[1\]\.class: class 'bulk' is not defined"):
        load_config(str(path))
    path.write_text(text.replace("class: bulk", "class: batch"))
    cfg = load_config(str(path))
    assert cfg.routes == [("/v1/batches", "batch"), ("/v1/files", "batch")] and cfg.key_teams == {"sk-1": "search"}


METERED = """
[tiers.metered]
requests = "100/hour"
tokens = "100000/day"

[orgs.acme]
tokens = "1000000/day"

[teams.search]
org = "acme"
[teams.ads]

[keys]
"sk-1" = { tier = "metered", team = "search" }
"sk-2" = { tier = "metered", team = "ads" }
"sk-3" = { tier = "metered", team = "search" }
"sk-solo" = "metered"
"sk-pro" = "pro"
"""


def _spend_tokens(http, calls):
    """Chat calls (50 tokens each, as the fake upstream reports) for each key."""
    for key, n in calls.items():
        for _ in range(n):
            assert http.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200


def _top_rows(http, query="tier=metered", expect=None):
    """/_nexus/top's rows once the keys' settled usage is there: (key, team, org, used)."""
    seen = {}

    def ready():
        r = http.get(f"/_nexus/top?{query}", headers=ADMIN)
        assert r.status_code == 200, r.text
        seen["doc"] = r.json()
        rows = [(row["key"], row.get("team"), row.get("org")) for row in seen["doc"]["top"]]
        return expect is None or rows == expect

    wait_for(ready)
    return seen["doc"]


def test_top_ranks_a_team_tiers_keys_by_what_they_use_in_the_hierarchy(tmp_path, upstream):
    """A key of a team is charged at its node of org > team > key, never in its tier's
    own limiter: /_nexus/top reads that node (it listed the tier's own counters, where
    those keys never appear)."""
    app = build_app(str(write(tmp_path, upstream.url, METERED)))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        _spend_tokens(http, {"sk-1": 3, "sk-2": 1, "sk-solo": 2, "sk-pro": 4})
        expect = [("sk-1", "search", "acme"), ("sk-solo", None, None), ("sk-2", "ads", None)]
        doc = _top_rows(http, expect=expect)
        assert doc["tier"] == "metered" and doc["limit"] == "tokens" and "detail" not in doc
        sk1, solo, sk2 = doc["top"]
        # 50 tokens a call, refilling at 100,000 a day (about 1.2 a second).
        assert 140 <= sk1["used"] <= 150 and 40 <= sk2["used"] <= 50 and 90 <= solo["used"] <= 100, doc
        assert sk1["limit"] == sk2["limit"] == solo["limit"] == 100_000
        assert sk1["id"] is None and solo["id"], "a plain key keeps its limiter's id"
        state = http.get("/_nexus/keys/sk-1", headers=ADMIN).json()["limits"]["key"]["tokens"]
        assert abs(state["used"] - sk1["used"]) <= 2, "the row is the key's node, as /_nexus/keys shows it"
        # The key that never called, and the keys of other tiers, are not listed.
        assert http.get("/_nexus/top?tier=metered&n=1", headers=ADMIN).json()["top"][0]["key"] == "sk-1"
        assert [r["key"] for r in http.get("/_nexus/top?tier=pro", headers=ADMIN).json()["top"]] == ["sk-pro"]


def test_top_ranks_team_keys_on_redis(tmp_path, upstream, redis_server):
    backend = (
        f'[backend]\ntype = "redis"\nurl = "redis://127.0.0.1:{redis_server.port}/0"\nprefix = "gwtop{free_port()}"\n'
    )
    app = build_app(str(write(tmp_path, upstream.url, METERED + backend)))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        _spend_tokens(http, {"sk-1": 1, "sk-2": 3, "sk-solo": 2})
        doc = _top_rows(http, expect=[("sk-2", "ads", None), ("sk-1", "search", "acme")])
        assert doc["limit"] == "tokens" and 140 <= doc["top"][0]["used"] <= 150, doc
        # The tier's keys outside teams are counted by its own limiter, which is not
        # ranked on Redis: said, not silently left out.
        assert doc["detail"] == "the keys of this tier outside teams are not ranked: top keys need the memory backend"
        # A tier without team keys is still a 501 on Redis.
        r = http.get("/_nexus/top?tier=pro", headers=ADMIN)
        assert r.status_code == 501 and "memory backend" in r.json()["detail"]


def test_top_ranks_the_keys_of_a_tier_whose_limits_classes_share(tmp_path, upstream):
    extra = METERED.replace("[keys]", "[classes]\ninteractive = 1.0\nbatch = 0.5\n\n[keys]")
    app = build_app(str(write(tmp_path, upstream.url, extra)))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        _spend_tokens(http, {"sk-1": 1, "sk-solo": 2})
        doc = _top_rows(http, expect=[("sk-solo", None, None), ("sk-1", "search", "acme")])
        assert 90 <= doc["top"][0]["used"] <= 100 and doc["top"][0]["id"] is None, doc


def test_a_key_removed_while_its_body_arrives_gets_a_401_and_holds_nothing(tmp_path, upstream):
    """The request was routed to its team when its head arrived; a reload removes the key
    before its body is complete: a 401 (what its next request gets), not a 500, and the
    team's lease and quota are as if it never came."""
    import json as _json

    from support.gateway_harness import connect, read_response

    extra = TEAM.replace('requests = "10/minute"', 'requests = "10/minute"\nconcurrency = 1')
    path = write(tmp_path, upstream.url, extra)
    app = build_app(str(path))
    body = _json.dumps(CHAT).encode()
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        port = int(gw.url.rsplit(":", 1)[1])
        with connect(port) as sock:
            head = (
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-1\r\n"
                b"content-type: application/json\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
            )
            sock.sendall(head + body[:10])
            time.sleep(0.2)  # the head is judged and routed; the body waits
            path.write_text(path.read_text().replace('"sk-1" = { tier = "pro", team = "search" }', ""))
            assert app.reload()
            sock.sendall(body[10:])
            status, _, answer = read_response(sock)
        assert status == 401, answer
        assert b"unknown or missing API key" in answer and b"sk-1" not in answer
        # The team's one concurrent place is free, and its quota untouched: sk-2 gets all 10.
        got = [http.post("/v1/chat/completions", json=CHAT, headers=auth("sk-2")).status_code for _ in range(11)]
        assert got == [200] * 10 + [429], got
        assert http.post("/v1/chat/completions", json=CHAT, headers=auth("sk-1")).status_code == 401
