"""A key source given twice never becomes a fresh key: the limiter and the app must
see the same client. Tested in front of Starlette under uvicorn, Flask under wsgiref
and Django under wsgiref, each of which reads a repeated field its own way
(Starlette: the first header, the last query parameter; WSGI servers and Django: the
header values joined with commas; Django's QueryDict: the last value)."""

from __future__ import annotations

import json

import httpx
import pytest
from support.servers import ASGIServer, WSGIServer

import nexus_limits as nl
from nexus_limits.adapters import Request, parse_key_spec
from nexus_limits.adapters.asgi import RateLimitMiddleware as ASGILimit
from nexus_limits.adapters.wsgi import RateLimitMiddleware as WSGILimit

ATTEMPTS = 20
LIMIT = 3


def starlette_app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def whoami(request):
        return JSONResponse(
            {
                "x-api-key": request.headers.get("x-api-key"),
                "authorization": request.headers.get("authorization"),
                "api_key": request.query_params.get("api_key"),
            }
        )

    return Starlette(routes=[Route("/whoami", whoami)])


def flask_app():
    from flask import Flask, jsonify, request

    app = Flask(__name__)

    @app.get("/whoami")
    def whoami():
        return jsonify(
            {
                "x-api-key": request.headers.get("x-api-key"),
                "authorization": request.headers.get("authorization"),
                "api_key": request.args.get("api_key"),
            }
        )

    return app


def _django_whoami(request):
    from django.http import JsonResponse

    return JsonResponse(
        {
            "x-api-key": request.headers.get("x-api-key"),
            "authorization": request.headers.get("authorization"),
            "api_key": request.GET.get("api_key"),
        }
    )


def _urlpatterns():
    from django.urls import path

    return [path("whoami", _django_whoami)]


urlpatterns = _urlpatterns()


class DjangoServer(WSGIServer):
    """Django's WSGI handler under wsgiref, our middleware configured by ``options``."""

    def __init__(self, options: dict) -> None:
        import django
        from django.conf import settings

        if not settings.configured:
            settings.configure(DEBUG=False, SECRET_KEY="tests", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__)
            django.setup()
        from django.core.handlers.wsgi import WSGIHandler
        from django.test import override_settings

        self.override = override_settings(
            ROOT_URLCONF=__name__,
            ALLOWED_HOSTS=["*"],
            MIDDLEWARE=["nexus_limits.adapters.django.RateLimitMiddleware"],
            NEXUS_LIMITS=options,
        )
        self.override.enable()
        super().__init__(WSGIHandler())

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.override.disable()


def serve(kind: str, **options):
    if kind == "starlette":
        app = starlette_app()
        app.add_middleware(ASGILimit, **options)
        return ASGIServer(app)
    if kind == "flask":
        app = flask_app()
        app.wsgi_app = WSGILimit(app.wsgi_app, **options)
        return WSGIServer(app)
    return DjangoServer(options)


KINDS = ["starlette", "flask", "django"]
# (key spec, the honest request, a second value the attacker adds)
SOURCES = {
    "header": (
        "header:x-api-key",
        {"headers": [("x-api-key", "alice")]},
        lambda i: {"headers": [("x-api-key", f"r{i}")]},
    ),
    "bearer": (
        "bearer",
        {"headers": [("authorization", "Bearer alice")]},
        lambda i: {"headers": [("authorization", f"Bearer r{i}")]},
    ),
    "query": ("query:api_key", {"params": [("api_key", "alice")]}, lambda i: {"params": [("api_key", f"r{i}")]}),
}


def merged(*parts: dict) -> dict:
    out: dict = {"headers": [], "params": []}
    for part in parts:
        for k, v in part.items():
            out[k] = out[k] + v
    return out


def assert_problem(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/problem+json"
    doc = response.json()
    assert doc["status"] == status
    for word in words:
        assert word in doc["detail"], doc


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", list(SOURCES))
def test_a_repeated_key_source_is_refused_not_joined(kind, source):
    spec, honest, extra = SOURCES[source]
    limiter = nl.FixedWindow(f"{LIMIT}/minute")
    with serve(kind, limiter=limiter, key=spec) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        # The app reads the honest value (first header / last parameter) or a joined
        # one; the limiter would have keyed on a fresh value every time.
        for i in range(ATTEMPTS):
            first, second = (honest, extra(i)) if i % 2 else (extra(i), honest)
            r = http.get("/whoami", **merged(first, second))
            assert_problem(r, 400, "different values")
        assert limiter.get_limit("alice") == (True, LIMIT), "nothing was charged"
        # The same value twice is one value.
        statuses = [http.get("/whoami", **merged(honest, honest)).status_code for _ in range(LIMIT)]
        assert statuses == [200] * LIMIT
        assert http.get("/whoami", **merged(honest)).status_code == 429, "identical repeats were charged to alice"
        assert limiter.get_limit("alice") == (False, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_key_forms(kind):
    limiter = nl.FixedWindow("100/minute")
    with serve(kind, limiter=limiter, key="bearer") as server, httpx.Client(base_url=server.url, timeout=10) as http:
        for headers, why in [
            ([("authorization", "Bearer a, Bearer b")], "different values"),
            ([("authorization", "Bearer a Bearer b")], "more than one credential"),
            ([("authorization", "Bearer a"), ("authorization", "Basic eDp5")], "different values"),
            ([("authorization", "Basic eDp5"), ("authorization", "Bearer a")], "different values"),
            ([("authorization", "Bearer a"), ("authorization", "")], "different values"),
        ]:
            assert_problem(http.get("/whoami", headers=headers), 400, why)
        # Not a bearer credential at all: no key (401), not a 400.
        digest = 'Digest username="u", realm="r", nonce="n", uri="/", response="x"'
        assert_problem(http.get("/whoami", headers={"authorization": digest}), 401)
        assert http.get("/whoami", headers={"authorization": "bearer  tok"}).status_code == 200
        assert limiter.get_limit("tok") == (True, 99), "scheme is case-insensitive, spaces are not part of the token"
    limiter = nl.FixedWindow("100/minute")
    with serve(kind, limiter=limiter, key="query:api_key") as server, httpx.Client(base_url=server.url) as http:
        for query, why in [
            ("api_key=a&api_key=b", "different values"),
            ("api_key=a&api%5Fkey=b", "different values"),
            ("api_key=a&api_key=", "different values"),
            ("api_key=%FF", "not UTF-8"),
        ]:
            assert_problem(http.get(f"/whoami?{query}"), 400, why)
        r = http.get("/whoami?api_key=a+b&api_key=a%20b")
        assert r.status_code == 200 and r.json()["api_key"] == "a b", "one value, two spellings"
        assert http.get("/whoami?api_key=x,y").status_code == 200, "a comma in a query value is a character"
        assert limiter.get_limit("x,y") == (True, 99)


@pytest.mark.parametrize("kind", KINDS)
def test_a_list_of_sources(kind):
    limiter = nl.FixedWindow("100/minute")
    spec = ["bearer", "header:x-api-key"]
    with serve(kind, limiter=limiter, key=spec) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/whoami", headers={"authorization": "Bearer a"}).status_code == 200
        assert http.get("/whoami", headers={"x-api-key": "a"}).status_code == 200
        assert http.get("/whoami", headers={"authorization": "Bearer a", "x-api-key": "a"}).status_code == 200
        assert limiter.get_limit("a") == (True, 97), "either source names the same client"
        r = http.get("/whoami", headers={"authorization": "Bearer a", "x-api-key": "b"})
        assert_problem(r, 400, "given twice with different values", "bearer", "header:x-api-key")
        assert_problem(http.get("/whoami"), 401)
    limiter = nl.FixedWindow("100/minute")
    spec = ["header:x-api-key", "ip"]
    with serve(kind, limiter=limiter, key=spec) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/whoami").status_code == 200
        assert limiter.get_limit("ip:127.0.0.1") == (True, 99), "no key: the address, in its own namespace"
        assert http.get("/whoami", headers={"x-api-key": "127.0.0.1"}).status_code == 200
        assert limiter.get_limit("127.0.0.1") == (True, 99), "a key cannot spend an address's budget"


def test_key_functions_may_raise_bad_request():
    def strict(request: Request) -> str:
        if request.headers.get("x-tenant") == "bad":
            raise nl.BadRequest("x-tenant 'bad' is not a tenant")
        return "t"

    app = ASGILimit(starlette_app(), limiter=nl.FixedWindow("9/minute"), key=strict)
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert_problem(http.get("/whoami", headers={"x-tenant": "bad"}), 400, "x-tenant 'bad' is not a tenant")
        assert http.get("/whoami").status_code == 200


def test_repeats_under_real_servers_reach_the_app_as_the_frameworks_say():
    """What each stack hands the app, so that the tests above test the real thing."""
    both = {"headers": [("x-api-key", "a"), ("x-api-key", "b")], "params": [("api_key", "a"), ("api_key", "b")]}
    seen = {}
    limiter = nl.FixedWindow("9/minute")
    for kind in KINDS:
        with serve(kind, limiter=limiter, key=lambda r: "same") as server, httpx.Client(base_url=server.url) as http:
            seen[kind] = http.get("/whoami", **both).json()
    assert seen["starlette"]["x-api-key"] == "a" and seen["starlette"]["api_key"] == "b"
    assert seen["flask"]["x-api-key"] == "a,b" and seen["flask"]["api_key"] == "a"
    assert seen["django"]["x-api-key"] == "a,b" and seen["django"]["api_key"] == "b"


def test_key_spec_parsing():
    r = Request("GET", "/", {"authorization": "Bearer abc", "x-key": " v "}, "key=q", "10.0.0.1")
    assert parse_key_spec(["header:x-missing", "bearer"])(r) == "abc"
    assert parse_key_spec(["bearer", "header:x-key"])(Request("GET", "/", {"x-key": "v"}, "", None)) == "v"
    assert parse_key_spec(["ip"])(r) == "10.0.0.1"
    assert parse_key_spec(["bearer", "ip"])(r) == "abc"
    assert parse_key_spec(["header:x-missing", "ip"])(r) == "ip:10.0.0.1"
    assert parse_key_spec("header:x-key")(r) == "v", "surrounding spaces are not part of a value"
    assert parse_key_spec("header:x-key")(Request("GET", "/", {"x-key": "v, v"}, "", None)) == "v"
    assert parse_key_spec("header:x-key")(Request("GET", "/", {"x-key": "  "}, "", None)) is None
    with pytest.raises(nl.BadRequest, match="x-key header is repeated"):
        parse_key_spec("header:x-key")(Request("GET", "/", {"x-key": "v,w"}, "", None))
    with pytest.raises(nl.BadRequest, match=r"\(bearer and header:x-key\)"):
        parse_key_spec(["bearer", "header:x-key"])(r)
    assert parse_key_spec([lambda q: 5, lambda q: 5])(r) == 5
    for bad, exc, why in [
        ([], ValueError, "empty list"),
        (["ip", "bearer"], ValueError, "'ip' can only be the last"),
        ([["bearer"]], TypeError, "cannot hold another list"),
        (["bearer", 5], TypeError, "key must be"),
        ("header:x api", ValueError, "not a header name"),
        ("header:", ValueError, "key must be"),
        ("query:", ValueError, "key must be"),
        ("cookie:x", ValueError, "key must be"),
        (None, TypeError, "key must be"),
    ]:
        with pytest.raises(exc, match=why):
            parse_key_spec(bad)


@pytest.mark.parametrize("kind", KINDS)
def test_many_repeats(kind):
    """Hundreds of repeats: identical ones are one key, one odd value is a 400."""
    limiter = nl.FixedWindow("9/minute")
    with serve(kind, limiter=limiter, key="header:x-api-key") as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/whoami", headers=[("x-api-key", "a")] * 80).status_code == 200
        r = http.get("/whoami", headers=[("x-api-key", "a")] * 80 + [("x-api-key", "b")])
        assert_problem(r, 400, "different values")
        assert json.loads(r.text)["title"] == "Bad Request"
    assert limiter.get_limit("a") == (True, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_oversized_keys_work_on_every_backend(kind, redis_server):
    """A key of thousands of characters (a JWT, or a client padding its header) is
    charged under its SHA-256: Redis refuses keys over 1 KiB, which was a 500."""
    import redis

    import nexus_limits.redis as nlr

    client = redis.Redis(port=redis_server.port)
    for limiter in (nl.FixedWindow("1/minute"), nlr.FixedWindow(client, "1/minute", prefix=f"long-{kind}")):
        with serve(kind, limiter=limiter, key="header:x-api-key") as server, httpx.Client(base_url=server.url) as http:
            long_key, other = "k" * 5000, "k" * 4999 + "j"
            assert http.get("/whoami", headers={"x-api-key": long_key}).status_code == 200
            assert http.get("/whoami", headers={"x-api-key": long_key}).status_code == 429
            assert http.get("/whoami", headers={"x-api-key": other}).status_code == 200, "another long key"
            assert http.get("/whoami", headers={"x-api-key": "k" * 256}).status_code == 200
            assert limiter.get_limit("k" * 256) == (False, 0), "up to 256 characters a key is kept as it is"
    client.close()
