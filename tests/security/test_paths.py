"""Path and method variants cannot step around a limit or into an exemption: every
adapter decides ``routes=``, ``exempt=`` and the policy on the normalised target.

The variants are sent byte for byte over a socket (httpx would normalise some of them
itself) to Starlette and FastAPI under real uvicorn (httptools and h11), Flask under
wsgiref, and Django under wsgiref."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from typing import Dict, List, Tuple

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.servers import ASGIServer, WSGIServer

import nexus_limits as nl
from nexus_limits.adapters import normalize_target
from nexus_limits.adapters.asgi import RateLimitMiddleware as ASGILimit
from nexus_limits.adapters.wsgi import RateLimitMiddleware as WSGILimit

CHAT = "/v1/chat/completions"
# Every spelling of CHAT that a server, a framework or an httpx-based proxy may take
# for it.
VARIANTS = [
    b"/v1/chat/completions",
    b"///v1/chat/completions",
    b"/v1//chat///completions",
    b"/v1/./chat/completions",
    b"/v1/x/../chat/completions",
    b"/v1/%2e%2e/v1/chat/completions",
    b"/v1/%2E/chat/completions",
    b"/v1/chat/completions/.",
    b"/v1/chat/completions/x/..",
    b"/v1/ch%61t/completions",
    b"/%761/chat/completions",
    b"/v1/chat/completions/",
]
# Targets that name no plain path: a 400 with a problem+json body, on every server.
REFUSED = {
    b"/v1/chat%3Fcompletions": "encoded '?'",
    b"/v1/chat/completions%23x": "encoded '#'",
    b"/v1/%00/chat/completions": "control character",
    b"/v1/%0D%0A/chat/completions": "control character",
    b"/v1%5Cchat/completions": "encoded '\\'",
}
# Only where the adapter sees the raw target (ASGI). WSGI servers and Django decode
# the path before the app routes on it: there an encoded "/" is a "/" and a "%zz" is
# the text "%zz", for the app as for the limiter.
REFUSED_RAW = {
    b"/v1%2Fchat/completions": "encoded '/'",
    b"/v1/%zz/chat/completions": "invalid percent-escape",
    b"/v1/%FF/chat/completions": "not UTF-8",
}
# Django keeps bytes that are not UTF-8 percent-encoded in request.path; WSGI does not.
REFUSED_WSGI = {b"/v1/%FF/chat/completions": "not UTF-8"}


class H11Server(ASGIServer):
    """ASGIServer on uvicorn's h11 protocol, which passes lower-case methods and
    absolute-form targets (``GET http://host/x``) through to the app."""

    def __init__(self, app) -> None:
        import uvicorn

        super().__init__(app)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", proxy_headers=False, http="h11"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)


def raw_http(port: int, method: bytes, target: bytes, headers: Tuple[Tuple[bytes, bytes], ...] = ()):
    """Sends one request exactly as given; (status, headers name -> values, body)."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close", b"Content-Length: 0"]
    lines += [k + b": " + v for k, v in headers]
    data = b""
    deadline = time.monotonic() + 10
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    out: Dict[str, List[str]] = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        out.setdefault(name.strip().lower().decode("latin-1"), []).append(value.strip().decode("latin-1"))
    if out.get("transfer-encoding") == ["chunked"]:
        plain, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            plain, rest = plain + rest[:n], rest[n + 2 :]
        body = plain
    return int(status_line.split()[1]), out, body


def policy_names(headers: Dict[str, List[str]]) -> List[str]:
    return re.findall(r'"([^"]*)";q=', ", ".join(headers.get("ratelimit-policy", [])))


def assert_bad_request(status, headers, body, why: str) -> None:
    assert status == 400, (status, body)
    assert headers["content-type"] == ["application/problem+json"]
    doc = json.loads(body)
    assert doc["status"] == 400 and doc["title"] == "Bad Request"
    assert why in doc["detail"], doc


# --- the function ---------------------------------------------------------------------


def test_normalize_target_examples():
    for target in VARIANTS:
        method, path = normalize_target("post", target.decode())
        assert method == "POST"
        assert path in (CHAT, CHAT + "/"), target
    assert normalize_target("GET", "ignored", b"/v1/%2e%2e/x") == ("GET", "/x"), "raw_path wins over path"
    cases = {
        "/": "/",
        "/..": "/",
        "/a/..": "/",
        "/a/.//../b": "/a/b",  # dots first, as httpx does, then slashes
        "/a b": "/a%20b",
        '/a"<>`{}^|[]': "/a%22%3C%3E%60%7B%7D%5E%7C%5B%5D",
        "/caf%c3%a9": "/caf%C3%A9",
        "/café": "/caf%C3%A9",
        "/a%7e%41": "/a~A",
        "/a%25": "/a%25",
        "/a;b=c,d:e@f!$&'()*+": "/a;b=c,d:e@f!$&'()*+",
        "/.well-known/x": "/.well-known/x",
        "/a/.b/..c/": "/a/.b/..c/",
    }
    for given_path, expected in cases.items():
        assert normalize_target("GET", given_path) == ("GET", expected), given_path
    assert normalize_target("x-Custom", "/")[0] == "X-CUSTOM"


@pytest.mark.parametrize(
    "method, target, why",
    [
        ("GET", "http://attacker.example/v1/chat/completions", "absolute URL"),
        ("CONNECT", "attacker.example:443", "does not start with '/'"),
        ("OPTIONS", "*", "'*'"),
        ("GET", "", "does not start with '/'"),
        ("GET", "v1/chat", "does not start with '/'"),
        ("GET", "/a?b", "'?'"),
        ("GET", "/a#b", "'#'"),
        ("GET", "/a\\b", "'\\'"),
        ("GET", "/a\x00b", "control character"),
        ("GET", "/a\tb", "control character"),
        ("GET", "/a%0d%0aSet-Cookie:x", "control character"),
        ("GET", "/a%7F", "control character"),
        ("GET", "/a%2fb", "encoded '/'"),
        ("GET", "/a%3f", "encoded '?'"),
        ("GET", "/a%23", "encoded '#'"),
        ("GET", "/a%5C", "encoded '\\'"),
        ("GET", "/a%", "invalid percent-escape"),
        ("GET", "/a%4", "invalid percent-escape"),
        ("GET", "/a%G0", "invalid percent-escape"),
        ("GET", "/a%C3", "not UTF-8"),
        ("GET", "/a%ED%A0%80", "not UTF-8"),  # an encoded surrogate
        ("GET", "/\ud800", "not UTF-8"),
        ("GE T", "/", "not an HTTP token"),
        ("", "/", "not an HTTP token"),
        ("GET\r\n", "/", "not an HTTP token"),
        ("GÉT", "/", "not an HTTP token"),
        ("G" * 65, "/", "not an HTTP token"),
    ],
)
def test_normalize_target_refuses(method, target, why):
    with pytest.raises(nl.BadRequest, match=re.escape(why)) as caught:
        normalize_target(method, target)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200, "one short line"


def test_normalize_target_raw_bytes():
    assert normalize_target("GET", "", b"/caf\xc3\xa9") == ("GET", "/caf%C3%A9")
    assert normalize_target("GET", "", bytearray(b"//a")) == ("GET", "/a")
    with pytest.raises(nl.BadRequest, match="not UTF-8"):
        normalize_target("GET", "", b"/\xff")
    with pytest.raises(TypeError, match="raw_path must be bytes"):
        normalize_target("GET", "/", "/")  # type: ignore[arg-type]


# A path-ish alphabet: separators, dots, escapes (valid or not), pchar, characters
# httpx encodes, non-ASCII.
PATH_CHARS = st.sampled_from([*"/./..%%%2e2E2f3F41aAzZ09-_~!$&'()*+,;=:@ \"<>`{}^|[]é€\\?#", "%2e", "%2E%2e"])
paths = st.lists(PATH_CHARS, max_size=30).map(lambda cs: "/" + "".join(cs))
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _normal_or_none(method: str, path: str):
    try:
        return normalize_target(method, path)
    except nl.BadRequest:
        return None


@SETTINGS
@given(st.sampled_from(["get", "POST", "Delete", "x-y"]), paths)
@example("post", "/v1/%2e%2e/v1/chat/completions/.")
def test_normalized_targets_are_fixed_points_with_no_dot_segments(method, path):
    out = _normal_or_none(method, path)
    if out is None:
        return
    assert normalize_target(*out) == out, "idempotent"
    m, p = out
    assert m == m.upper() and p.startswith("/")
    assert "//" not in p
    segments = p.split("/")
    assert "." not in segments and ".." not in segments
    assert re.fullmatch(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*", p), "plain ASCII, escapes only"
    for escape in re.findall(r"%(..)", p):
        assert escape == escape.upper() and int(escape, 16) not in (0x2F, 0x3F, 0x23, 0x5C)
    # httpx sends the normalised path as it is: a proxy forwards what was judged.
    assert httpx.URL("http://upstream.example" + p).raw_path == p.encode()


@SETTINGS
@given(paths)
@example("/a/.//../b")
@example("/v1/chat/completions/.")
@example("/a/%2e%2e/b")
def test_targets_httpx_sends_alike_normalise_alike(path):
    """norm(p) == norm(what httpx sends for p): so two targets httpx would send as the
    same URL normalise to the same path, and what a proxy forwards is what was judged."""
    ours = _normal_or_none("GET", path)
    try:
        url = httpx.URL("http://upstream.example" + path)
    except httpx.InvalidURL:
        return
    sent = url.raw_path.decode("ascii").partition("?")[0]
    theirs = _normal_or_none("GET", sent)
    if ours is not None and "?" not in path and "#" not in path:
        assert theirs == ours, (path, sent)


# --- the adapters in front of real servers ----------------------------------------------


def starlette_app():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def chat(request):
        return PlainTextResponse("chat")

    async def other(request):
        return PlainTextResponse(request.url.path)

    return Starlette(
        routes=[
            Route(CHAT, chat, methods=["POST"]),
            Route("/health", other),
            Route("/search", other),
            Route("/search/{rest:path}", other),
            Route("/search-advanced", other),
        ]
    )


def fastapi_app():
    from fastapi import FastAPI

    app = FastAPI()

    @app.post(CHAT)
    async def chat() -> str:
        return "chat"

    @app.get("/health")
    async def health() -> str:
        return "ok"

    return app


def flask_app():
    from flask import Flask

    app = Flask(__name__)

    @app.route(CHAT, methods=["POST"])
    def chat():
        return "chat"

    @app.route("/health")
    def health():
        return "ok"

    return app


class DjangoServer(WSGIServer):
    """Django's WSGI handler under wsgiref, our middleware configured by ``options``."""

    def __init__(self, options: dict) -> None:
        import django
        from django.conf import settings as django_settings

        if not django_settings.configured:
            django_settings.configure(DEBUG=False, SECRET_KEY="tests", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__)
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


def _django_view(request):
    from django.http import HttpResponse

    return HttpResponse(request.path_info)


def _urlpatterns():
    from django.urls import path

    return [path(CHAT.lstrip("/"), _django_view), path("health", _django_view)]


urlpatterns = _urlpatterns()


def _serve(kind: str, options: dict):
    """A context manager serving the app of ``kind`` behind our middleware."""
    if kind in ("starlette", "fastapi", "starlette-h11"):
        app = starlette_app() if kind != "fastapi" else fastapi_app()
        app.add_middleware(ASGILimit, **options)
        return (H11Server if kind == "starlette-h11" else ASGIServer)(app)
    if kind == "flask":
        app = flask_app()
        app.wsgi_app = WSGILimit(app.wsgi_app, **options)
        return WSGIServer(app)
    return DjangoServer(options)


KINDS = ["starlette", "starlette-h11", "fastapi", "flask", "django"]


@pytest.mark.parametrize("kind", KINDS)
def test_path_variants_are_charged_to_the_route(kind):
    route_limit = nl.FixedWindow(f"{len(VARIANTS) - 4}/minute")
    options = {
        "limiter": nl.FixedWindow("1000/minute"),
        "key": "header:x-api-key",
        "routes": {CHAT: route_limit},
        "exempt": ["/health"],
    }
    key = ((b"x-api-key", b"k"),)
    with _serve(kind, options) as server:
        answers = [raw_http(server.port, b"POST", target, key) for target in VARIANTS]
        statuses = [status for status, _, _ in answers]
        assert 429 not in statuses[:-4] and statuses[-4:] == [429] * 4, list(zip(VARIANTS, statuses))
        for target, (status, headers, _) in zip(VARIANTS, answers):
            assert policy_names(headers) == [CHAT], (target, status, headers)
        assert route_limit.get_limit("k") == (False, 0)
        # The exemption holds for its own path only, however the path is spelt.
        for target in (b"/health/../v1/chat/completions", b"/health/%2e%2e/v1/chat/completions"):
            status, headers, _ = raw_http(server.port, b"POST", target, key)
            assert status == 429 and policy_names(headers) == [CHAT], target
        for target in (b"/health", b"//health", b"/./health"):
            status, headers, _ = raw_http(server.port, b"GET", target)
            assert status != 401 and "ratelimit" not in headers, target


@pytest.mark.parametrize("kind", KINDS)
def test_unjudgeable_targets_are_a_400_problem(kind):
    limiter = nl.FixedWindow("1000/minute")
    refused = dict(REFUSED)
    refused.update(REFUSED_RAW if kind in ("starlette", "starlette-h11", "fastapi") else {})
    refused.update(REFUSED_WSGI if kind == "flask" else {})
    with _serve(kind, {"limiter": limiter, "key": "header:x-api-key"}) as server:
        for target, why in refused.items():
            status, headers, body = raw_http(server.port, b"POST", target, ((b"x-api-key", b"k"),))
            assert_bad_request(status, headers, body, why)
    assert limiter.get_limit("k") == (True, 1000), "nothing was charged"


def test_h11_absolute_form_and_lower_case_methods():
    limiter = nl.FixedWindow("6/minute")
    options = {
        "limiter": limiter,
        "key": "header:x-api-key",
        "cost": lambda r: 5 if r.method == "POST" else 1,
    }
    key = ((b"x-api-key", b"k"),)
    with _serve("starlette-h11", options) as server:
        for method, target, why in [
            (b"GET", b"http://attacker.example/v1/chat/completions", "absolute URL"),
            (b"POST", b"http://127.0.0.1/v1/chat/completions", "absolute URL"),
            (b"OPTIONS", b"*", "'*'"),
            (b"GET", b"/a#fragment", "'#'"),
            (b"GET", b"/a\\b", "'\\'"),
        ]:
            assert_bad_request(*raw_http(server.port, method, target, key), why)
        status, headers, _ = raw_http(server.port, b"post", CHAT.encode(), key)
        assert status == 405, "h11 passes 'post' on; Starlette does not route it, but it was charged"
        assert headers["x-ratelimit-remaining"] == ["1"], "a lower-case post costs what a POST costs"
        status, _, _ = raw_http(server.port, b"pOsT", CHAT.encode(), key)
        assert status == 429
    assert limiter.get_limit("k") == (True, 1)


def test_routes_match_by_segment_and_keep_their_name():
    options = {
        "limiter": nl.FixedWindow("100/minute"),
        "key": "header:x-api-key",
        "routes": {"/search": nl.FixedWindow("1/minute"), "/v1/search/": nl.FixedWindow("5/minute")},
    }
    app = starlette_app()
    app.add_middleware(ASGILimit, **options)
    with ASGIServer(app) as server, httpx.Client(base_url=server.url) as http:
        key = {"x-api-key": "k"}
        first = http.get("/search", headers=key)
        assert first.status_code == 200 and policy_names({"ratelimit-policy": [first.headers["ratelimit-policy"]]}) == [
            "/search"
        ]
        assert first.headers["ratelimit"].startswith('"/search";r=0;')
        assert http.get("/search/x", headers=key).status_code == 429, "a sub-path is on the route"
        advanced = http.get("/search-advanced", headers=key)
        assert advanced.status_code == 200, "/search does not hold /search-advanced"
        assert advanced.headers["ratelimit-policy"] == '"default";q=100;w=60'
        denied = http.get("/search/deeper/still", headers=key)
        assert denied.status_code == 429 and denied.json()["policy"] == "/search"
        other = http.get("/v1/search/x", headers=key)
        assert other.headers["ratelimit-policy"].startswith('"/v1/search/";q=5')


def test_bad_route_and_exempt_options():
    from nexus_limits.adapters.asgi import RateLimitMiddleware

    limiter = nl.FixedWindow("1/minute")
    for bad, why in [
        ({"routes": {"search": limiter}}, "not a path starting with '/'"),
        ({"routes": {"/a?b": limiter}}, "cannot be a request path"),
        ({"routes": {"/a%2Fb": limiter}}, "encoded '/'"),
        ({"exempt": ["health"]}, "not a path starting with '/'"),
        ({"exempt": ["/100%"]}, "invalid percent-escape"),
        ({"exempt": [None]}, "not a path"),
        ({"policy_name": "dÉfaut"}, "printable ASCII"),
        ({"tiers": {"prö": limiter}}, "printable ASCII"),
    ]:
        with pytest.raises(ValueError, match=re.escape(why)):
            RateLimitMiddleware(None, limiter, **bad)
    with pytest.raises(TypeError, match="exempt must be a list of paths, not one string"):
        RateLimitMiddleware(None, limiter, exempt="/health")
    with pytest.raises(TypeError, match="routes must be a dict"):
        RateLimitMiddleware(None, limiter, routes=["/a"])
    # Written decoded or encoded, a configured path names what the framework routes on.
    mw = RateLimitMiddleware(None, limiter, exempt=["/files/café/", "/a%20b", "//x/./y"])
    assert mw.limits.exempted(normalize_target("GET", "/files/caf%C3%A9/1")[1])
    assert mw.limits.exempted(normalize_target("GET", "/a b")[1])
    assert mw.limits.exempted(normalize_target("GET", "/x/y")[1])


def test_websockets_are_judged_on_the_normalised_path_too():
    import websockets.sync.client as ws

    async def echo(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "hi"})
        await send({"type": "websocket.close", "code": 1000})

    limiter = nl.FixedWindow("1/minute")
    app = ASGILimit(echo, limiter=nl.FixedWindow("100/minute"), key="ip", routes={"/ws": limiter})
    with ASGIServer(app) as server:
        with ws.connect(f"ws://127.0.0.1:{server.port}/ws") as conn:
            assert conn.recv() == "hi"
        for path in ("//ws", "/x/../ws", "/%77s", "/ws%3F"):
            with pytest.raises(Exception, match="403|rejected"):
                with ws.connect(f"ws://127.0.0.1:{server.port}{path}"):
                    pass
    assert limiter.get_limit("127.0.0.1") == (False, 0)
