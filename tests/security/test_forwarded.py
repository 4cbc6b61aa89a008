"""``key="ip"`` behind trusted proxies: only the header the operator's proxy writes is
read, from the right, past trusted hops only; IPv6 clients are keyed per network so
that one host cannot rotate addresses; IPv4-mapped addresses are IPv4.

The app runs under real uvicorn (on 127.0.0.1, and on ::1 for a real IPv6 peer); the
test client plays the trusted proxy by sending the header the proxy would have
written."""

from __future__ import annotations

import ipaddress
import threading

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.servers import ASGIServer, free_port

import nexus_limits as nl
from nexus_limits.adapters import Request, client_ip, parse_key_spec
from nexus_limits.adapters.asgi import RateLimitMiddleware as ASGILimit
from nexus_limits.adapters.wsgi import RateLimitMiddleware as WSGILimit

LOOPBACK = ["127.0.0.0/8", "::1/128"]


async def hello(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


class IPv6Server(ASGIServer):
    """ASGIServer listening on ::1 (a real IPv6 peer)."""

    def __init__(self, app) -> None:
        import uvicorn

        super().__init__(app)
        self.port = free_port()
        config = uvicorn.Config(
            app, host="::1", port=self.port, log_level="warning", lifespan="off", proxy_headers=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://[::1]:{self.port}"


def keyed(limiter, **options):
    """A server whose only limit is 1/minute per client address."""
    return ASGIServer(ASGILimit(hello, limiter=limiter, key="ip", trusted_proxies=LOOPBACK, **options))


def test_the_clients_own_forwarded_header_does_not_win_over_the_proxys():
    limiter = nl.FixedWindow("1/minute")
    with keyed(limiter) as server, httpx.Client(base_url=server.url) as http:
        # The proxy appended X-Forwarded-For; the client sent its own Forwarded, new
        # each time. Before, Forwarded won: a fresh key per request.
        for i in range(5):
            r = http.get("/", headers={"forwarded": f"for=198.51.100.{i}", "x-forwarded-for": "203.0.113.7"})
            assert r.status_code == (200 if i == 0 else 429), i
        assert limiter.get_limit("203.0.113.7") == (False, 0)
        for i in range(5):
            assert limiter.get_limit(f"198.51.100.{i}") == (True, 1)
        # A client-sent X-Real-IP is ignored too.
        r = http.get("/", headers={"x-real-ip": "198.51.100.99", "x-forwarded-for": "203.0.113.7"})
        assert r.status_code == 429


@pytest.mark.parametrize(
    "header, value, client",
    [
        ("forwarded", 'for=198.51.100.1, for="[2001:db8:cafe::17]:4711";proto=https', "2001:db8:cafe::/64"),
        ("forwarded", "for=198.51.100.1;by=10.0.0.1, for=203.0.113.9", "203.0.113.9"),
        ("forwarded", 'for="_hidden", for=203.0.113.9', "203.0.113.9"),
        ("x-real-ip", "203.0.113.9", "203.0.113.9"),
        ("x-forwarded-for", "198.51.100.1, 203.0.113.9:8080", "203.0.113.9"),
    ],
)
def test_the_chosen_header_is_read(header, value, client):
    limiter = nl.FixedWindow("1/minute")
    others = {h: "192.0.2.66" for h in ("x-forwarded-for", "x-real-ip") if h != header}
    if header != "forwarded":
        others["forwarded"] = "for=192.0.2.66"
    with keyed(limiter, forwarded_header=header) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/", headers={header: value, **others}).status_code == 200
        assert limiter.get_limit(client) == (False, 0), "keyed on the chosen header's client"
        assert limiter.get_limit("192.0.2.66") == (True, 1), "the other headers are ignored"


def test_the_walk_from_the_right_past_trusted_hops_only():
    limiter = nl.FixedWindow("100/minute")
    trusted = [*LOOPBACK, "10.0.0.0/8"]
    app = ASGILimit(hello, limiter=limiter, key="ip", trusted_proxies=trusted)
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        # Whatever the client puts on the left, the address our first proxy saw wins.
        for spoof in ("1.1.1.1", "10.9.9.9", "garbage", "1.1.1.1, 2.2.2.2"):
            r = http.get("/", headers={"x-forwarded-for": f"{spoof}, 203.0.113.5, 10.0.0.2"})
            assert r.status_code == 200
        assert limiter.get_limit("203.0.113.5") == (True, 96)
        # Repeated headers are one list, in order: the proxy appended the last one.
        r = http.get("/", headers=[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "203.0.113.6")])
        assert r.status_code == 200 and limiter.get_limit("203.0.113.6") == (True, 99)
        # An entry that is no address: nothing left of it is vouched for -> the peer.
        assert http.get("/", headers={"x-forwarded-for": "203.0.113.5, unknown"}).status_code == 200
        assert limiter.get_limit("127.0.0.1") == (True, 99)
        # All trusted: the left-most.
        assert http.get("/", headers={"x-forwarded-for": "10.1.1.1, 10.2.2.2"}).status_code == 200
        assert limiter.get_limit("10.1.1.1") == (True, 99)


def test_headers_from_an_untrusted_peer_are_ignored():
    limiter = nl.FixedWindow("1/minute")
    app = ASGILimit(hello, limiter=limiter, key="ip", trusted_proxies=["10.0.0.0/8"], forwarded_header="forwarded")
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/", headers={"forwarded": "for=1.1.1.1"}).status_code == 200
        assert http.get("/", headers={"forwarded": "for=2.2.2.2"}).status_code == 429
    assert limiter.get_limit("127.0.0.1") == (False, 0)


def test_ipv6_clients_are_keyed_per_network():
    for prefix, second in ((None, 429), (64, 429), (48, 429), (128, 200)):
        limiter = nl.FixedWindow("1/minute")
        options = {} if prefix is None else {"ipv6_prefix": prefix}
        with keyed(limiter, **options) as server, httpx.Client(base_url=server.url) as http:
            assert http.get("/", headers={"x-forwarded-for": "2001:db8:1:2::1"}).status_code == 200
            rotated = http.get("/", headers={"x-forwarded-for": "2001:db8:1:2:a:b:c:d"})
            assert rotated.status_code == second, prefix
            assert http.get("/", headers={"x-forwarded-for": "2001:db8:1:3::1"}).status_code == (
                429 if prefix == 48 else 200
            ), "another /64 is another client"


def test_a_real_ipv6_peer():
    limiter = nl.FixedWindow("1/minute")
    with IPv6Server(ASGILimit(hello, limiter=limiter, key="ip")) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/").status_code == 200
        assert http.get("/").status_code == 429
    assert limiter.get_limit("::/64") == (False, 0), "::1 keyed as its /64"
    limiter = nl.FixedWindow("1/minute")
    app = ASGILimit(hello, limiter=limiter, key="ip", ipv6_prefix=128, trusted_proxies=["::1"])
    with IPv6Server(app) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/", headers={"x-forwarded-for": "::ffff:203.0.113.8"}).status_code == 200
        assert http.get("/", headers={"x-forwarded-for": "203.0.113.8"}).status_code == 429
    assert limiter.get_limit("203.0.113.8") == (False, 0), "IPv4-mapped IPv6 is its IPv4 address"


def test_ipv4_mapped_peers_and_proxies():
    key = parse_key_spec("ip", ["::ffff:10.0.0.0/104"])
    assert key(Request("GET", "/", {"x-forwarded-for": "203.0.113.1"}, "", "10.1.2.3")) == "203.0.113.1"
    assert key(Request("GET", "/", {"x-forwarded-for": "203.0.113.1"}, "", "::ffff:10.1.2.3")) == "203.0.113.1"
    assert parse_key_spec("ip")(Request("GET", "/", {}, "", "::ffff:198.51.100.4")) == "198.51.100.4"
    assert parse_key_spec("ip")(Request("GET", "/", {}, "", "fe80::1%eth0")) == "fe80::/64"
    assert parse_key_spec("ip", ipv6_prefix=128)(Request("GET", "/", {}, "", "fe80::1%eth0")) == "fe80::1"
    assert parse_key_spec("ip")(Request("GET", "/", {}, "", "not an address")) is None


def test_wsgi_reads_the_chosen_header_too():
    from support.servers import WSGIServer

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    limiter = nl.FixedWindow("1/minute")
    wrapped = WSGILimit(app, limiter=limiter, key="ip", trusted_proxies=LOOPBACK, forwarded_header="x-real-ip")
    with WSGIServer(wrapped) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/", headers={"x-real-ip": "203.0.113.3", "x-forwarded-for": "1.1.1.1"}).status_code == 200
        assert http.get("/", headers={"x-real-ip": "203.0.113.3", "x-forwarded-for": "2.2.2.2"}).status_code == 429


def test_option_values_are_checked():
    for options, exc, why in [
        ({"forwarded_header": "x-client-ip"}, ValueError, "forwarded_header must be one of"),
        ({"forwarded_header": None}, ValueError, "forwarded_header must be one of"),
        ({"ipv6_prefix": 0}, ValueError, "from 1 to 128"),
        ({"ipv6_prefix": 129}, ValueError, "from 1 to 128"),
        ({"ipv6_prefix": True}, TypeError, "ipv6_prefix must be an int"),
        ({"ipv6_prefix": "64"}, TypeError, "ipv6_prefix must be an int"),
        ({"ipv6_prefix": 64.0}, TypeError, "ipv6_prefix must be an int"),
        ({"trusted_proxies": "10.0.0.0/8"}, TypeError, "not one string"),
        ({"trusted_proxies": ["10.0.0.0/33"]}, ValueError, "is not an IP address or network"),
        ({"trusted_proxies": [None]}, ValueError, "is not an IP address or network"),
    ]:
        with pytest.raises(exc, match=why):
            ASGILimit(hello, limiter=nl.FixedWindow("1/s"), key="ip", **options)
    assert ASGILimit(hello, limiter=nl.FixedWindow("1/s"), forwarded_header="Forwarded").limits is not None


addresses = st.one_of(
    st.ip_addresses().map(str),
    st.builds(lambda ip: f"[{ip}]:443", st.ip_addresses(v=6)),
    st.builds(lambda ip: f'"{ip}"', st.ip_addresses()),
    st.text(max_size=20),
    st.text(alphabet=st.characters(blacklist_characters=',;"=\\'), max_size=20),
)
NO_SEPARATORS = st.one_of(
    st.ip_addresses().map(str),
    st.builds(lambda ip: f"[{ip}]:443", st.ip_addresses(v=6)),
    st.text(alphabet=st.characters(blacklist_characters=',;"=\\'), max_size=20),
)


def _canon(text: str):
    """An independent reading of one hop: the address in it, IPv4-mapped as IPv4."""
    text = text.strip().strip('"')
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:
        text = text.split(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip


@settings(max_examples=300, deadline=None)
@given(
    st.ip_addresses().map(str),
    st.lists(NO_SEPARATORS, max_size=6),
    st.sampled_from(["x-forwarded-for", "forwarded", "x-real-ip"]),
)
def test_the_key_is_the_peer_or_a_hop_the_chain_vouches_for(peer, hops, header):
    trusted = ["10.0.0.0/8", "::1/128", "127.0.0.0/8"]
    nets = [ipaddress.ip_network(t) for t in trusted]
    value = ", ".join(f"for={h}" for h in hops) if header == "forwarded" else ", ".join(hops)
    decoys = {"forwarded": "for=6.6.6.6", "x-forwarded-for": "6.6.6.6", "x-real-ip": "6.6.6.6"}
    request = Request("GET", "/", {**decoys, header: value}, "", peer)
    got = client_ip(request, nets, header)
    peer_ip = _canon(peer)
    assert got is not None
    got_ip = ipaddress.ip_address(got)
    if got_ip == peer_ip:
        return
    assert any(peer_ip in n for n in nets), "only a trusted peer's header is read"
    hop_ips = [_canon(h) for h in hops if header == "forwarded" or h.strip()]  # empty list items are no hops
    assert got_ip in hop_ips, "the client is one of the hops the proxy wrote"
    i = len(hop_ips) - 1 - hop_ips[::-1].index(got_ip)
    right = hop_ips[i + 1 :]
    assert all(h is not None and any(h in n for n in nets) for h in right), "only trusted hops were passed"
    if any(got_ip in n for n in nets):
        # (the same address may be several hops: the right-most of them is not the point)
        assert got_ip == hop_ips[0], "a trusted hop is the client only when every hop is trusted: the left-most"
        assert all(h is not None and any(h in n for n in nets) for h in hop_ips), "every hop is trusted"
    key = parse_key_spec("ip", trusted, forwarded_header=header)(request)
    assert key == (got if got_ip.version == 4 else str(ipaddress.ip_network(f"{got_ip}/64", strict=False)))


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses().map(str), st.lists(addresses, max_size=6), st.sampled_from(["x-forwarded-for", "forwarded"]))
def test_hostile_chains_never_crash_nor_name_a_header_not_chosen(peer, hops, header):
    value = ", ".join(f"for={h}" for h in hops) if header == "forwarded" else ", ".join(hops)
    other = "x-forwarded-for" if header == "forwarded" else "forwarded"
    decoy = "6.6.6.6" if header == "forwarded" else "for=6.6.6.6"
    request = Request("GET", "/", {header: value, other: decoy}, "", peer)
    got = client_ip(request, [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")], header)
    assert got is not None
    assert got != "6.6.6.6" or "6.6.6.6" in value
