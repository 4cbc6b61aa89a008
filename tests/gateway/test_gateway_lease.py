"""[backend] lease: a tier whose one limit is requests is served by a leased Redis
TokenBucket (blocks of quota spent in-process), exactly: two gateways together never
admit more than the quota. Other tiers, and configs where nothing can lease, are told."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support import fake_llm
from support.servers import ASGIServer

from nexus_limits.gateway import ConfigError, build_app, load_config
from nexus_limits.gateway.lease import LeasedLimiter

CONFIG = """
[upstream]
url = "{url}"

[backend]
type = "redis"
url = "redis://127.0.0.1:{port}/0"
prefix = "{prefix}"
{lease}

[tiers.hot]
requests = "{rate}"

[tiers.tokens]
requests = "100/minute"
tokens = "10000/minute"

[keys]
"sk-hot" = "hot"
"sk-tokens" = "tokens"
"""


@pytest.fixture
def upstream():
    with ASGIServer(fake_llm.app) as server:
        yield server


def write(tmp_path, url, port, lease, prefix, rate="40/minute"):
    path = tmp_path / "gw.toml"
    path.write_text(CONFIG.format(url=url, port=port, lease=lease, prefix=prefix, rate=rate))
    return path


def test_two_leasing_gateways_never_admit_more_than_the_quota(tmp_path, upstream, redis_server, redis_client):
    path = write(tmp_path, upstream.url, redis_server.port, "lease = true", "gwlease")
    first, second = build_app(str(path)), build_app(str(path))
    assert isinstance(first.tiers["hot"].limiter, LeasedLimiter)
    assert not isinstance(first.tiers["tokens"].limiter, LeasedLimiter), "token limits are reserved per call"
    with ASGIServer(first, lifespan="on") as a, ASGIServer(second, lifespan="on") as b:
        with httpx.Client(timeout=10) as http:
            urls = [a.url, b.url] * 50

            def call(url):
                return http.get(f"{url}/v1/models", headers={"authorization": "Bearer sk-hot"})

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(call, urls))
            codes = [r.status_code for r in answers]
            assert codes.count(200) <= 40, "never more than the quota, whatever the blocks"
            assert codes.count(200) >= 30, "the price of leasing is bounded under-use"
            assert set(codes) == {200, 429}
            refused = next(r for r in answers if r.status_code == 429)
            assert refused.headers["x-ratelimit-limit-requests"] == "40" and int(refused.headers["retry-after"]) >= 1
            metrics = http.get(f"{a.url}/metrics").text
    stats = first.tiers["hot"].limiter.stats()
    assert stats["allowed"] + stats["denied"] == 50
    assert "nexus_limits_quota_lease_total" in metrics


def test_a_lease_policy_table_and_its_mistakes(tmp_path, redis_server):
    lease = "[backend.lease]\nwindow = 0.1\nmax_share = 0.2\n"
    path = write(tmp_path, "http://127.0.0.1:1", redis_server.port, lease, "gwlease2")
    cfg = load_config(str(path))
    assert cfg.lease == {"window": 0.1, "max_share": 0.2}
    assert build_app(str(path)).tiers["hot"].limiter.bucket.lease_policy.max_share == 0.2
    for lease, where in [
        ("lease = 1", "backend.lease: must be true, false or a table"),
        ("[backend.lease]\nwindow = -1\n", "backend.lease.window: LeasePolicy window must be above 0"),
        ("[backend.lease]\nwindow = nan\n", "backend.lease.window: LeasePolicy window must be above 0"),
        ("[backend.lease]\nwindw = 1\n", "backend.lease.windw: unknown field"),
        ('[backend.lease]\nmax_keys = "10"\n', "backend.lease.max_keys: "),
    ]:
        path = write(tmp_path, "http://127.0.0.1:1", redis_server.port, lease, "gwlease2")
        with pytest.raises(ConfigError, match=r"gw\.toml:\d+: " + where.replace(".", r"\.")):
            load_config(str(path))


def test_lease_is_refused_where_it_cannot_be_exact(tmp_path):
    path = tmp_path / "gw.toml"
    memory = '[upstream]\nurl = "http://x"\n[backend]\nlease = true\n[tiers.t]\nrequests = "1/s"\n'
    path.write_text(memory)
    with pytest.raises(ConfigError, match=r":4: backend\.lease: needs type = 'redis'"):
        load_config(str(path))
    tokens = memory.replace("[backend]", '[backend]\ntype = "redis"\nurl = "redis://127.0.0.1:1/0"')
    path.write_text(tokens.replace('requests = "1/s"', 'requests = "1/s"\ntokens = "100/s"'))
    with pytest.raises(ConfigError, match=r"backend\.lease: no tier can lease: .* only for a tier whose one limit"):
        load_config(str(path))
