"""Attacks on the gateway's orgs, teams, priority classes and their config: each test is
a bypass (or a crash) found by trying, through the gateway as users run it (real
uvicorn, or ``nexus-limits gateway`` in its own process for SIGHUP), with the fake LLM
upstream and a real redis-server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest
from support import fake_llm
from support.servers import ASGIServer, free_port

from nexus_limits.gateway import ConfigError, build_app, load_config


def auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def upstream():
    with ASGIServer(fake_llm.app) as server:
        yield server


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


# -- a reload on Redis: the new quotas are written before any key is routed to them ----


def _many_teams(url: str, port: int, redis_url: str, prefix: str, teams: int, new: bool) -> str:
    text = (
        f'[server]\nport = {port}\n\n[upstream]\nurl = "{url}"\n\n'
        f'[backend]\ntype = "redis"\nurl = "{redis_url}"\nprefix = "{prefix}"\n\n'
        '[tiers.pro]\nrequests = "1000/day"\n\n'
    )
    text += "".join(f'[teams.t{i}]\nrequests = "5/day"\n' for i in range(teams))
    if new:
        text += '[teams.new]\nrequests = "2/day"\n'
    text += "\n[keys]\n" + "".join(f'"k{i}" = {{ tier = "pro", team = "t{i}" }}\n' for i in range(teams))
    if new:
        text += '"sk-new" = { tier = "pro", team = "new" }\n'
    return text


def test_a_team_added_by_sighup_on_redis_is_never_served_before_its_quota_is_written(tmp_path, upstream, redis_server):
    """The bypass: a reload routed a new team's key at once, while the team's quota was
    still being written to Redis in a worker thread; until then the team (and the key)
    had the level's default, unlimited. With a config of 2,000 teams, a key of a new
    team with 2 requests a day was served hundreds of times during the reload."""
    port = free_port()
    path = tmp_path / "gw.toml"
    prefix = f"teams-race-{time.time_ns()}"
    path.write_text(_many_teams(upstream.url, port, redis_server.url, prefix, 2000, new=False))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_limits.cli", "gateway", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    codes: list = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            def up():
                try:
                    return http.get("/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            _wait_for(up)
            stop = time.monotonic() + 5

            def hammer():
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                    while time.monotonic() < stop:
                        codes.append(client.get("/v1/models", headers=auth("sk-new")).status_code)

            threads = [threading.Thread(target=hammer) for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(0.3)
            path.write_text(_many_teams(upstream.url, port, redis_server.url, prefix, 2000, new=True))
            os.kill(proc.pid, signal.SIGHUP)
            for t in threads:
                t.join(30)
    finally:
        proc.terminate()
        proc.wait(20)
    seen = Counter(codes)
    assert seen[200] == 2, f"the new team's 2/day admitted {seen[200]} requests: {seen}"
    assert set(seen) <= {200, 401, 429, 503}, seen


# -- hostile configs: a ConfigError naming file:line:field, never a traceback ---------

_YAML_HEAD = 'upstream:\n  url: "http://127.0.0.1:9"\ntiers:\n  pro:\n    requests: "100/minute"\n'


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        # A lone surrogate (YAML's "\ud800" escape) passed every check and crashed the
        # build with UnicodeEncodeError when the hierarchy was made.
        ('teams:\n  "\\ud800": {requests: "1/second"}\nkeys:\n  k: {tier: pro, team: "\\ud800"}\n', ":9: keys[…].team"),
        ('teams:\n  t: {requests: "1/second"}\nkeys:\n  "\\ud800": {tier: pro, team: t}\n', ":9: keys"),
        ('orgs:\n  "\\ud800": {requests: "1/second"}\nteams:\n  t: {org: t}\n', ":7: orgs"),
        ('classes:\n  a: 1.0\n  "\\ud800": 0.5\n', ":8: classes"),
        ('backend:\n  prefix: "p\\ud800"\n', ":7: backend.prefix"),
        # An empty class name was a ValueError from the hierarchy at build.
        ('classes:\n  a: 1.0\n  "": 0.5\n', ":8: classes"),
        # A class a header can never name (the header is refused past 64 bytes; a
        # space or a non-ASCII letter never compares equal once sent).
        ("classes:\n  a: 1.0\n  " + "b" * 65 + ": 0.5\n", ":8: classes"),
        ('classes:\n  a: 1.0\n  "bulk jobs": 0.5\n', ":8: classes"),
        ('classes:\n  a: 1.0\n  "\\0": 0.5\n', ":8: classes"),
    ],
)
def test_hostile_names_in_a_config_are_located_errors_not_tracebacks(tmp_path, extra, where):
    path = tmp_path / "gw.yaml"
    path.write_text(_YAML_HEAD + extra, encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        build_app(str(path))
    assert f"gw.yaml{where}" in str(error.value), str(error.value)


# -- a batch route served as interactive -------------------------------------------

_ROUTED = """
[upstream]
url = "{url}"

[tiers.pro]
requests = "4/day"
class = "interactive"

[classes]
interactive = 1.0
batch = 0.5

[[routes]]
path = "{route}"
class = "batch"

[keys]
"sk-1" = "pro"
"""


@pytest.mark.parametrize(
    "route",
    [
        "/v1/batches",
        "/v1/batches/",
        # An escape of an unreserved letter: the gateway decodes it in every request path,
        # so this route never matched, and batch calls took the interactive reserve.
        "/v1/%62atches",
        "/v1/%62%61tches/",
    ],
)
@pytest.mark.parametrize(
    "target",
    [b"/v1/batches", b"/v1//batches", b"/v1/./batches", b"/v1/%62atches", b"/v1/batches/", b"/v1/batches?x=1"],
)
def test_a_batch_route_holds_whatever_the_spelling_of_the_route_or_the_request(tmp_path, upstream, route, target):
    from support.gateway_harness import GatewayServer, raw_request

    path = tmp_path / "gw.toml"
    path.write_text(_ROUTED.format(url=upstream.url, route=route))
    head = b"POST %s HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-1\r\ncontent-length: 2" % target
    with GatewayServer(str(path)) as gw:
        codes = [raw_request(gw.port, head, b"{}")[0] for _ in range(4)]
    assert codes == [200, 200, 429, 429], f"batch may use half of 4/day: {codes}"


@pytest.mark.parametrize(
    ("routes", "detail"),
    [
        # Two routes for one path (the second written with a slash): the first won silently.
        (
            '[[routes]]\npath = "/v1/batches"\nclass = "batch"\n[[routes]]\npath = "/v1/batches/"\nclass = "interactive"\n',
            ":17: routes[1].path: the path '/v1/batches' is routed twice (routes[0])",
        ),
        (
            '[[routes]]\npath = "/v1/%62atches"\nclass = "batch"\n[[routes]]\npath = "/v1/batches"\nclass = "interactive"\n',
            ":17: routes[1].path: the path '/v1/batches' is routed twice (routes[0])",
        ),
        ('[[routes]]\npath = "/v1/a%2Fb"\nclass = "batch"\n', ":14: routes[0].path:"),
        ('[[routes]]\npath = "/v1/a%zz"\nclass = "batch"\n', ":14: routes[0].path:"),
    ],
)
def test_routes_that_cannot_be_matched_as_written_are_config_errors(tmp_path, routes, detail):
    text = _ROUTED.format(url="http://127.0.0.1:9", route="/x").split("[[routes]]")[0] + routes
    path = tmp_path / "gw.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        build_app(str(path))
    assert detail in str(error.value), str(error.value)


# -- hostile numbers and YAML aliases: bounded, located errors ------------------------

_BIG = "1" + "0" * 5000


def _alias_bomb(depth: int = 8) -> str:
    """A few hundred bytes of YAML whose value, expanded, is 9**depth integers: the
    parser shares the lists, printing the value expands them."""
    text = "&b0 [1,1,1,1,1,1,1,1,1]"
    for i in range(1, depth):
        text = f"&b{i} [" + ",".join([text] + [f"*b{i - 1}"] * 8) + "]"
    return "[" + ",".join([text] + [f"*b{depth - 1}"] * 8) + "]"


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        # A 5,000-digit integer: Python's int() refuses it with a ValueError that
        # escaped the loader (no file, no line) from the TOML and YAML parsers alike.
        ("gw.toml", f'[upstream]\nurl = "http://127.0.0.1:9"\n[tiers.pro]\nconcurrency = {_BIG}\n', "gw.toml:4:"),
        ("gw.yaml", f'upstream:\n  url: "http://127.0.0.1:9"\ntiers:\n  pro:\n    concurrency: {_BIG}\n', "gw.yaml:5:"),
        (
            "gw.yaml",
            f'upstream:\n  url: "http://127.0.0.1:9"\ntiers:\n  pro:\n    concurrency: 0x{"f" * 5000}\n',
            "gw.yaml:5: tiers.pro.concurrency: must be at least 1",
        ),
        (
            "gw.yaml",
            f'upstream:\n  url: "http://127.0.0.1:9"\ntiers:\n  pro: {{requests: "1/s"}}\n  ? 0x{"f" * 5000}\n  : {{}}\n',
            "gw.yaml:3: tiers.<an integer of about 6021 digits>: names must be strings",
        ),
        # The error message printed the whole value: a 1 KB file took over a minute and
        # gigabytes to report "must be a path".
        (
            "gw.yaml",
            f'upstream:\n  url: "http://127.0.0.1:9"\ntiers:\n  pro: {{requests: "1/s"}}\ngateway:\n  metrics_path: {_alias_bomb()}\n',
            "gw.yaml:6: gateway.metrics_path: must be a path",
        ),
        (
            "gw.yaml",
            f'upstream:\n  url: "http://127.0.0.1:9"\ntiers:\n  pro: {{requests: "1/s"}}\nkeys:\n  k: {{tier: {_alias_bomb()}}}\n',
            "gw.yaml:6: keys[…]: tier",
        ),
        (
            "gw.yaml",
            f'upstream:\n  url: "http://127.0.0.1:9"\ntiers:\n  pro: {{requests: "1/s"}}\ngateway:\n  key: {_alias_bomb()}\n',
            "gw.yaml:6: gateway.key: must be",
        ),
    ],
)
def test_hostile_numbers_and_aliases_are_short_located_errors(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    # In a process of its own: a loader that expands the value is stopped, not waited for.
    code = (
        "import sys\nfrom nexus_limits.gateway import load_config, ConfigError\n"
        "try:\n    load_config(sys.argv[1])\nexcept ConfigError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert where in done.stdout, done.stdout
    assert len(done.stdout) < 1000, "the message shows the value cut short"


@pytest.mark.parametrize(
    ("gateway", "header"),
    [
        ('class_header = "authorization"', "authorization"),
        ('class_header = "X-Tenant-Key"\nkey = ["bearer", "header:x-tenant-key"]', "x-tenant-key"),
        ('class_header = "content-length"', "content-length"),
        ('class_header = "x-api-key"', "x-api-key"),
    ],
)
def test_a_class_header_that_carries_something_else_is_a_config_error(tmp_path, gateway, header):
    """Accepted, a class header naming the key's header made every request of a key a
    400 (its value is not a class); one naming a framing header, the same."""
    text = _ROUTED.format(url="http://127.0.0.1:9", route="/v1/batches") + f"\n[gateway]\n{gateway}\n"
    path = tmp_path / "gw.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert f"gateway.class_header: {header!r} carries something else" in str(error.value), str(error.value)


def _two_configs(url: str, port: int, redis_url: str, prefix: str, big: str, teams: int) -> str:
    text = (
        f'[server]\nport = {port}\n\n[upstream]\nurl = "{url}"\n\n'
        f'[backend]\ntype = "redis"\nurl = "{redis_url}"\nprefix = "{prefix}"\n\n'
        '[tiers.pro]\nrequests = "1000/day"\n\n'
    )
    text += "".join(f'[teams.t{i}]\nrequests = "5/day"\n' for i in range(teams))
    # Written last of the teams: the slow reload writes it after the quick one did.
    text += f'[teams.big]\nrequests = "{big}"\n'
    text += "\n[keys]\n" + "".join(f'"k{i}" = {{ tier = "pro", team = "t{i}" }}\n' for i in range(teams))
    text += '"sk-x" = { tier = "pro", team = "big" }\n'
    return text


def test_two_quick_sighups_on_redis_leave_the_newest_quotas_in_force(tmp_path, upstream, redis_server):
    """The bypass: two reloads in quick succession wrote their quotas in parallel worker
    threads; the slow one (a large config) finished last and left its quotas in Redis,
    and its routes, under the newer config: a team cut to 2/day kept its 1000/day."""
    port = free_port()
    path = tmp_path / "gw.toml"
    prefix = f"teams-twice-{time.time_ns()}"
    path.write_text(_two_configs(upstream.url, port, redis_server.url, prefix, "1000/day", 1))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_limits.cli", "gateway", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            def reloads(n):
                try:
                    text = http.get("/metrics").text
                except httpx.TransportError:
                    return False
                return n == 0 or f'nexus_limits_config_reloads_total{{result="ok"}} {n}.0' in text

            _wait_for(lambda: reloads(0))
            # The slow reload: 3,000 teams and keys to write, "big" keeps 1000/day.
            path.write_text(_two_configs(upstream.url, port, redis_server.url, prefix, "1000/day", 3000))
            os.kill(proc.pid, signal.SIGHUP)
            _wait_for(lambda: reloads(1))
            # The quick one, right after: the teams are gone and "big" has 2/day.
            path.write_text(_two_configs(upstream.url, port, redis_server.url, prefix, "2/day", 0))
            os.kill(proc.pid, signal.SIGHUP)
            _wait_for(lambda: reloads(2))
            time.sleep(3)  # both reloads' writes are done by now
            codes = Counter(http.get("/v1/models", headers=auth("sk-x")).status_code for _ in range(6))
    finally:
        proc.terminate()
        proc.wait(20)
    assert codes[200] == 2, f"team big has 2/day in the running config: {codes}"


# -- every level charged alike, on every route, whatever the upstream does ------------

_LEVELS = """
[upstream]
url = "{url}"

[gateway]
admin_token_env = "NL_TEAMS_ATTACK_ADMIN"
key = ["bearer", "header:x-api-key"]

[tiers.pro]
requests = "1000/day"
tokens = "1000000/day"
concurrency = 8

[orgs.acme]
requests = "1000/day"
tokens = "1000000/day"
concurrency = 8

[teams.search]
org = "acme"
requests = "1000/day"
tokens = "1000000/day"
concurrency = 8

[keys]
"sk-team" = {{ tier = "pro", team = "search" }}
"""

_CALLS = [
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}),
    (
        "/v1/chat/completions",
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": True},
    ),
    ("/v1/responses", {"model": "gpt-4o", "input": "hi", "max_output_tokens": 20}),
    ("/v1/responses", {"model": "gpt-4o", "input": "hi", "max_output_tokens": 20, "stream": True}),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "max_tokens": 20}),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
    (
        "/v1/messages",
        {"model": "claude-3-5-sonnet-latest", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]},
    ),
    (
        "/v1/messages",
        {
            "model": "claude-3-5-sonnet-latest",
            "max_tokens": 20,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
    ),
    ("/v1/models", None),
]


@pytest.mark.parametrize("behaviour", ["", "usage=omit", "usage=huge", "usage=negative", "status=500", "cut"])
def test_every_level_is_charged_alike_on_every_route_whatever_the_upstream_does(tmp_path, monkeypatch, behaviour):
    """A key of a team is charged the same at its org, its team and itself, on every
    route (LLM or not, streamed or not), when the upstream omits the usage, reports a
    hostile one, fails or cuts the connection; and every concurrency place is back."""
    from support.fake_provider import FakeProvider, serve
    from support.gateway_harness import GatewayServer

    monkeypatch.setenv("NL_TEAMS_ATTACK_ADMIN", "adm")
    provider = FakeProvider()
    with serve(provider) as upstream:
        path = tmp_path / "gw.toml"
        path.write_text(_LEVELS.format(url=upstream.url))
        with GatewayServer(str(path)) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:

            def levels():
                doc = http.get("/_nexus/keys/sk-team", headers={"authorization": "Bearer adm"}).json()["limits"]
                return {
                    level: (state["requests"]["used"], state["tokens"]["used"], state["concurrency"]["in_flight"])
                    for level, state in doc.items()
                }

            for route, body in _CALLS:
                headers = {"authorization": "Bearer sk-team", "x-fake": behaviour}
                try:
                    if body is None:
                        http.get(route, headers=headers)
                    else:
                        http.post(route, json=body, headers=headers).read()
                except httpx.HTTPError:
                    pass  # a cut connection reaches the client as one

                def alike():
                    seen = levels()
                    return len(set(seen.values())) == 1 and next(iter(seen.values()))[2] == 0

                try:
                    _wait_for(alike, 5)
                except AssertionError:
                    raise AssertionError(f"{route} with {behaviour!r}: {levels()}") from None
            if behaviour == "":
                assert levels()["team"][0] == len(_CALLS), "each call counted once at every level"


def test_a_client_leaving_mid_stream_frees_every_level(tmp_path, monkeypatch):
    """The official SDKs read one event of a stream and close it while the upstream
    pauses: every level settles alike and gives its concurrency place back."""
    import anthropic
    import openai
    from support.fake_provider import FakeProvider, serve
    from support.gateway_harness import GatewayServer

    monkeypatch.setenv("NL_TEAMS_ATTACK_ADMIN", "adm")
    provider = FakeProvider()
    with serve(provider) as upstream:
        path = tmp_path / "gw.toml"
        path.write_text(_LEVELS.format(url=upstream.url))
        with GatewayServer(str(path)) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:

            def levels():
                doc = http.get("/_nexus/keys/sk-team", headers={"authorization": "Bearer adm"}).json()["limits"]
                return {
                    level: (state["requests"]["used"], state["tokens"]["used"], state["concurrency"]["in_flight"])
                    for level, state in doc.items()
                }

            pause = {"x-fake": "pause_mid=5"}
            oa = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-team", max_retries=0, default_headers=pause)
            stream = oa.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=20, stream=True
            )
            next(iter(stream))
            assert {state[2] for state in levels().values()} == {1}, "a place held at every level meanwhile"
            stream.close()
            _wait_for(lambda: {state[2] for state in levels().values()} == {0}, 5)
            an = anthropic.Anthropic(base_url=gw.url, api_key="sk-team", max_retries=0, default_headers=pause)
            with an.messages.stream(
                model="claude-3-5-sonnet-latest", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
            ) as events:
                next(iter(events))
                assert {state[2] for state in levels().values()} == {1}
            _wait_for(lambda: {state[2] for state in levels().values()} == {0}, 5)
            seen = levels()
            assert len(set(seen.values())) == 1 and seen["team"][0] == 2, seen
            assert provider.received[-1].disconnected is not None, "the upstream call was cut"


@pytest.mark.parametrize("key", ["sk-team", "sk-solo"])
def test_calls_the_upstream_refuses_still_count_as_requests(tmp_path, key):
    """The bypass: every call the upstream answered with an error was refunded in full,
    its request count included, at every level. A key past its team's 3 requests a
    day sent calls built to fail (a 400 from the provider) without end: each reached
    the upstream, on the operator's account, and none was counted."""
    from support.fake_provider import FakeProvider, serve
    from support.gateway_harness import GatewayServer

    provider = FakeProvider()
    text = _LEVELS.replace(
        '[teams.search]\norg = "acme"\nrequests = "1000/day"', '[teams.search]\norg = "acme"\nrequests = "3/day"'
    )
    text = text.replace('[tiers.pro]\nrequests = "1000/day"', '[tiers.pro]\nrequests = "3/day"')
    text += '"sk-solo" = "pro"\n'
    with serve(provider) as upstream:
        path = tmp_path / "gw.toml"
        path.write_text(text.format(url=upstream.url).replace('admin_token_env = "NL_TEAMS_ATTACK_ADMIN"\n', ""))
        with GatewayServer(str(path)) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
            body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
            headers = {"authorization": f"Bearer {key}", "x-fake": "status=400"}
            codes = [http.post("/v1/chat/completions", json=body, headers=headers).status_code for _ in range(6)]
    assert len(provider.for_key(key)) == 3, f"3 requests a day reached the upstream {len(provider.for_key(key))} times"
    assert codes == [400, 400, 400, 429, 429, 429], codes


# -- reloads under traffic -------------------------------------------------------------


def _hup_config(url: str, port: int, backend: str, variant: int) -> str:
    # Each variant changes something around the team (a tier's output estimate, a new
    # team, the org's quota), never the team's own 20 a day.
    return (
        f'[server]\nport = {port}\n\n[upstream]\nurl = "{url}"\n\n{backend}\n'
        f'[tiers.pro]\nrequests = "1000/day"\ndefault_output_tokens = {100 + variant}\n\n'
        f'[orgs.acme]\nrequests = "{1000 + variant}/day"\n\n'
        '[teams.search]\norg = "acme"\nrequests = "20/day"\n\n'
        f'[teams.extra{variant}]\nrequests = "5/day"\n\n'
        '[keys]\n"sk-1" = { tier = "pro", team = "search" }\n"sk-2" = { tier = "pro", team = "search" }\n'
        f'"sk-extra" = {{ tier = "pro", team = "extra{variant}" }}\n'
    )


@pytest.mark.parametrize("store", ["memory", "redis", "memory-workers"])
def test_sighups_under_traffic_neither_lose_nor_skip_a_team_quota(tmp_path, upstream, redis_server, store):
    """Two keys of a team hammer it while the config is reloaded again and again (its
    team's quota unchanged): the team admits exactly its 20, no more and no fewer (with
    2 workers on the memory backend, each reloading on its own, the team lives in their
    shared memory)."""
    port = free_port()
    backend = (
        f'[backend]\ntype = "redis"\nurl = "{redis_server.url}"\nprefix = "hup-{time.time_ns()}"\n'
        if store == "redis"
        else ""
    )
    path = tmp_path / "gw.toml"

    def hup_config(variant: int) -> str:
        text = _hup_config(upstream.url, port, backend, variant)
        return text.replace("[server]\n", "[server]\nworkers = 2\n") if store == "memory-workers" else text

    path.write_text(hup_config(0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_limits.cli", "gateway", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    codes: list = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            def up():
                try:
                    return http.get("/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            _wait_for(up)
            stop = time.monotonic() + 4

            def hammer(key):
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                    while time.monotonic() < stop:
                        codes.append(client.get("/v1/models", headers=auth(key)).status_code)

            threads = [threading.Thread(target=hammer, args=(k,)) for k in ("sk-1", "sk-2", "sk-1", "sk-2")]
            for t in threads:
                t.start()
            for variant in range(1, 8):
                time.sleep(0.4)
                path.write_text(hup_config(variant))
                os.kill(proc.pid, signal.SIGHUP)
            for t in threads:
                t.join(30)
    finally:
        proc.terminate()
        proc.wait(20)
    seen = Counter(codes)
    assert seen[200] == 20 and set(seen) <= {200, 429}, seen


# -- a request's class: what a client can and cannot choose ----------------------------

_CLASSED = """
[upstream]
url = "{url}"

[gateway]
{gateway}

[tiers.bulk]
requests = "{tier}"
class = "batch"

[classes]
interactive = 1.0
batch = 0.5

[teams.search]
requests = "{team}"

[keys]
"sk-1" = {{ tier = "bulk", team = "search" }}
"""


@pytest.mark.parametrize(
    "headers",
    [
        [("x-nexus-priority", "interactive")],
        [("X-Nexus-Priority", "interactive")],
        [("x-priority", "interactive")],
        [("x-nexus-class", "interactive")],
    ],
)
def test_a_client_cannot_raise_its_class_without_a_trusted_header(tmp_path, upstream, headers):
    """Without class_header, no header a client sends changes its class: a batch tier's
    key may use half of its team's 4."""
    path = tmp_path / "gw.toml"
    path.write_text(_CLASSED.format(url=upstream.url, gateway="", tier="100/day", team="4/day"))
    app = build_app(str(path))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        codes = [http.get("/v1/models", headers=[*auth("sk-1").items(), *headers]).status_code for _ in range(4)]
    assert codes == [200, 200, 429, 429], codes


@pytest.mark.parametrize(
    "value",
    [
        b"interactive, interactive",
        b"Interactive",
        b"interactive\xa0x",
        b"\xc3\xafnteractive",
        b"i" * 65,
    ],
)
def test_odd_class_header_values_are_400s_and_charge_nothing(tmp_path, upstream, value):
    from support.gateway_harness import GatewayServer, raw_request

    path = tmp_path / "gw.toml"
    path.write_text(
        _CLASSED.format(url=upstream.url, gateway='class_header = "x-nexus-priority"', tier="100/day", team="4/day")
    )
    head = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-1\r\nx-nexus-priority: " + value
    with GatewayServer(str(path)) as gw:
        status, _, body = raw_request(gw.port, head)
        assert status == 400 and b"x-nexus-priority" in body, (status, body)
        # Nothing was charged: batch still has its 2, and interactive the rest.
        codes = [raw_request(gw.port, head.rsplit(b"\r\n", 1)[0])[0] for _ in range(3)]
        trusted = head.rsplit(b"\r\n", 1)[0] + b"\r\nx-nexus-priority: interactive"
        codes += [raw_request(gw.port, trusted)[0] for _ in range(3)]
    assert codes == [200, 200, 429, 200, 200, 429], codes


@pytest.mark.parametrize(("tier", "team", "served"), [("2/day", "10/day", 2), ("10/day", "3/day", 3)])
def test_a_team_key_gets_the_tighter_of_its_tier_and_its_team(tmp_path, upstream, tier, team, served):
    path = tmp_path / "gw.toml"
    text = _CLASSED.format(url=upstream.url, gateway="", tier=tier, team=team)
    path.write_text(text.replace('class = "batch"\n', "").replace("[classes]\ninteractive = 1.0\nbatch = 0.5\n", ""))
    app = build_app(str(path))
    with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
        codes = [http.get("/v1/models", headers=auth("sk-1")).status_code for _ in range(served + 2)]
    assert codes == [200] * served + [429, 429], codes


# -- [backend] lease: hostile LeasePolicy values, named by their field -----------------

_LEASE = '[upstream]\nurl = "http://127.0.0.1:9"\n\n[backend]\ntype = "redis"\nurl = "redis://127.0.0.1:9/0"\n{lease}\n[tiers.hot]\nrequests = "10/second"\n'


@pytest.mark.parametrize(
    ("lease", "where"),
    [
        (
            "[backend.lease]\nwindow = 0.1\nmax_share = 2.0\n",
            ":9: backend.lease.max_share: LeasePolicy max_share must be",
        ),
        ("[backend.lease]\nhold = nan\n", ":8: backend.lease.hold: LeasePolicy hold must be above 0"),
        ("[backend.lease]\nidle = inf\n", ":8: backend.lease.idle: "),
        ("[backend.lease]\nwindow = 1\nmax_keys = 1e400\n", ":9: backend.lease.max_keys: "),
        ("[backend.lease]\nmax_keys = true\n", ":8: backend.lease.max_keys: LeasePolicy max_keys must be an int"),
        ('[backend.lease]\nwindow = "50ms"\n', ":8: backend.lease.window: "),
        ("[backend.lease]\nwindow = { a = 1 }\n", ":8: backend.lease.window: "),
        ("lease = { max_share = -1 }", ":7: backend.lease.max_share: LeasePolicy max_share must be"),
        ("[backend.lease]\nwindw = 1\n", ":8: backend.lease.windw: unknown field"),
    ],
)
def test_a_hostile_lease_policy_is_named_by_its_field(tmp_path, lease, where):
    """Refused already, but located at backend.lease as a whole: the reader had to guess
    which of five fields was wrong."""
    path = tmp_path / "gw.toml"
    path.write_text(_LEASE.format(lease=lease))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert f"gw.toml{where}" in str(error.value), str(error.value)


def test_a_refusal_by_either_hierarchy_leaves_the_other_uncharged(tmp_path, monkeypatch):
    """The limits and the dollar budgets are two hierarchies charged one after the
    other: a refusal by the second gives the first's reservation back, and a refusal by
    the first never reaches the second."""
    from support.fake_provider import FakeProvider, serve
    from support.gateway_harness import GatewayServer

    monkeypatch.setenv("NL_TEAMS_ATTACK_ADMIN", "adm")
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000}
    with serve(FakeProvider()) as upstream:
        path = tmp_path / "gw.toml"
        text = _LEVELS.format(url=upstream.url)
        # The org's dollars cannot pay for a 2,000-token answer; the team has 1 request.
        text = text.replace(
            '[orgs.acme]\nrequests = "1000/day"', '[orgs.acme]\nspend = "0.01/day"\nrequests = "1000/day"'
        )
        text = text.replace(
            '[teams.search]\norg = "acme"\nrequests = "1000/day"', '[teams.search]\norg = "acme"\nrequests = "1/day"'
        )
        path.write_text(text)
        with GatewayServer(str(path)) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:

            def requests_used():
                doc = http.get("/_nexus/keys/sk-team", headers={"authorization": "Bearer adm"}).json()["limits"]
                return [doc[level]["requests"]["used"] for level in ("org", "team", "key")]

            def dollars_used():
                return gw.app.spend_tree.hierarchy.inspect(("acme",))["spend"]["used"]

            r = http.post("/v1/chat/completions", json=body, headers=auth("sk-team"))
            assert r.status_code == 429 and "spend budget" in r.json()["error"]["message"], r.text
            assert requests_used() == [0, 0, 0], "the limits' reservation was given back"
            small = {**body, "max_tokens": 5}
            assert http.post("/v1/chat/completions", json=small, headers=auth("sk-team")).status_code == 200
            _wait_for(lambda: requests_used() == [1, 1, 1], 5)
            spent = dollars_used()
            assert spent > 0
            r = http.post("/v1/chat/completions", json=small, headers=auth("sk-team"))
            assert r.status_code == 429 and r.headers["x-nexus-limit-policy"] == "team.requests", r.text
            # (The budget refills a micro-dollar every few seconds meanwhile.)
            assert spent - 1 <= dollars_used() <= spent, "the limits refused: no dollar was reserved"


# -- YAML: a key given twice through a merge ---------------------------------------------

_MERGED = 'upstream:\n  url: "http://127.0.0.1:9"\ntiers:\n  pro: {requests: "1/s"}\n  free: {requests: "1/minute"}\nteams:\n  a: {requests: "100/s"}\n  b: {requests: "1/minute"}\n'


@pytest.mark.parametrize(
    ("keys", "where"),
    [
        # The key in team a through the merge, in team b written below: YAML kept b
        # silently, and a reader of the file saw the key in a.
        (
            "keys:\n  <<: {sk-1: {tier: pro, team: a}}\n  sk-1: {tier: free, team: b}\n",
            "gw.yaml:11: keys[…]: given twice",
        ),
        (
            "keys:\n  <<: [{sk-1: {tier: pro, team: a}}, {sk-1: {tier: free, team: b}}]\n",
            "gw.yaml:10: keys[…]: given twice",
        ),
        ("keys:\n  sk-1: {tier: pro, team: a}\n  sk-1: {tier: free, team: b}\n", "gw.yaml:11: keys[…]: given twice"),
        ("keys:\n  sk-1: {tier: pro, team: a, team: b}\n", "gw.yaml:10: keys[…].team: given twice"),
    ],
)
def test_a_yaml_key_given_twice_through_a_merge_is_an_error(tmp_path, keys, where):
    path = tmp_path / "gw.yaml"
    path.write_text(_MERGED + keys)
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(error.value).endswith(f"{where} (keep one)"), str(error.value)


def test_a_yaml_merge_without_repeats_is_read(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(_MERGED + "keys:\n  <<: {sk-1: {tier: pro, team: a}}\n  sk-2: {tier: free, team: b}\n")
    cfg = load_config(str(path))
    assert cfg.key_teams == {"sk-1": "a", "sk-2": "b"}


# -- the admin endpoint for a key of a team ----------------------------------------------


@pytest.mark.parametrize(
    ("target", "token", "status", "shows"),
    [
        (b"/_nexus/keys/sk-team", "adm", 200, b'"team": "search"'),
        (b"/_nexus/keys/sk%2Dteam", "adm", 200, b'"team": "search"'),
        (b"//_nexus/./keys/sk-team", "adm", 200, b'"org": "acme"'),
        (b"/_nexus/keys/sk-team", "ad", 403, b"admin token"),
        (b"/_nexus/keys/sk-team", "", 403, b"admin token"),
        (b"/_nexus/keys/%ED%A0%80", "adm", 400, b"not UTF-8"),
        (b"/_nexus/keys/%00", "adm", 400, b"control character"),
        (b"/_nexus/keys/" + b"k" * 5000, "adm", 400, b"1 to 4096"),
        (b"/_nexus/keys/%E2%80%8B", "adm", 400, b"printable"),
        (b"/_nexus/keys?key=sk-team&key=sk-2", "adm", 400, b"give the key once"),
        (b"/_nexus/keys?key=%FF", "adm", 400, b"give the key once"),
    ],
)
def test_the_admin_view_of_a_team_key_under_hostile_requests(tmp_path, monkeypatch, target, token, status, shows):
    from support.fake_provider import FakeProvider, serve
    from support.gateway_harness import GatewayServer, raw_request

    monkeypatch.setenv("NL_TEAMS_ATTACK_ADMIN", "adm")
    provider = FakeProvider()
    with serve(provider) as upstream:
        path = tmp_path / "gw.toml"
        path.write_text(_LEVELS.format(url=upstream.url))
        with GatewayServer(str(path)) as gw:
            auth_header = b"authorization: Bearer " + token.encode()
            got, _, body = raw_request(gw.port, b"GET " + target + b" HTTP/1.1\r\nhost: x\r\n" + auth_header)
    assert (got, shows in body) == (status, True), body[:300]
    assert provider.received == [], "nothing under /_nexus reaches the upstream"


# -- /_nexus/top for a tier of teams ---------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "status", "shows"),
    [
        (b"tier=pro", 200, b'"team": "search"'),
        (b"tier=pro&n=1", 200, b'"key": "sk-team"'),
        (b"tier=pro&tier=pro", 400, b"at most once"),
        (b"tier=pro&n=2&n=3", 400, b"at most once"),
        (b"tier=pro&n=0", 400, b"n from 1 to 1000"),
        (b"tier=pro&n=1001", 400, b"n from 1 to 1000"),
        (b"tier=pro&n=-1", 400, b"n from 1 to 1000"),
        (b"tier=pro&n=nan", 400, b"n from 1 to 1000"),
        (b"tier=pro&n=1e3", 400, b"n from 1 to 1000"),
        (b"tier=pro&n=1_0", 400, b"n from 1 to 1000"),
        (b"tier=pro&n=%D9%A5", 400, b"n from 1 to 1000"),  # an Arabic-Indic 5
        (b"tier=pro&n=" + b"9" * 5000, 400, b"n from 1 to 1000"),
        (b"tier=%FF", 400, b"tier must be a tier"),
        (b"tier=" + b"p" * 5000, 400, b"tier must be a tier"),
        (b"tier=pro%00", 400, b"tier must be a tier"),
    ],
)
def test_top_of_a_team_tier_under_hostile_queries(tmp_path, monkeypatch, query, status, shows):
    from support.fake_provider import FakeProvider, serve
    from support.gateway_harness import GatewayServer, raw_request

    monkeypatch.setenv("NL_TEAMS_ATTACK_ADMIN", "adm")
    provider = FakeProvider()
    with serve(provider) as upstream:
        path = tmp_path / "gw.toml"
        path.write_text(_LEVELS.format(url=upstream.url))
        with GatewayServer(str(path)) as gw:
            with httpx.Client(base_url=f"http://127.0.0.1:{gw.port}", timeout=10) as http:
                call = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
                assert http.post("/v1/chat/completions", json=call, headers=auth("sk-team")).status_code == 200
            admin = b" HTTP/1.1\r\nhost: x\r\nauthorization: Bearer adm"
            # (the call's usage is settled after its answer)
            _wait_for(lambda: b'"top": []' not in raw_request(gw.port, b"GET /_nexus/top?tier=pro" + admin)[2])
            head = b"GET /_nexus/top?" + query + admin
            got, _, body = raw_request(gw.port, head)
    assert (got, shows in body) == (status, True), body[:300]
    if status != 200:
        assert b"sk-team" not in body, "a refusal does not list keys"


def test_top_of_a_team_tier_with_redis_away_is_a_503_naming_no_key(tmp_path, upstream, monkeypatch):
    from support.servers import RedisServer

    server = RedisServer().start()
    try:
        backend = f'[backend]\ntype = "redis"\nurl = "{server.url}"\nprefix = "top-away"\non_error = "deny"\n'
        text = _LEVELS.format(url=upstream.url).replace("[tiers.pro]", backend + "\n[tiers.pro]")
        (tmp_path / "gw.toml").write_text(text)
        monkeypatch.setenv("NL_TEAMS_ATTACK_ADMIN", "adm")
        app = build_app(str(tmp_path / "gw.toml"))
        admin = {"authorization": "Bearer adm"}
        with ASGIServer(app, lifespan="on") as gw, httpx.Client(base_url=gw.url, timeout=30) as http:
            call = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
            assert http.post("/v1/chat/completions", json=call, headers=auth("sk-team")).status_code == 200
            _wait_for(lambda: http.get("/_nexus/top?tier=pro", headers=admin).json()["top"] != [])
            server.stop()
            r = http.get("/_nexus/top?tier=pro", headers=admin)
            assert r.status_code == 503 and "could not be read" in r.json()["detail"], r.text
            assert "sk-team" not in r.text and "search" not in r.text
    finally:
        server.close()
