"""The seed interface: every limiter has ``middleware(app, key=..., **options)`` (an ASGI
or a WSGI app, detected), ``get_limit(key)`` and ``reset(key)``."""

from __future__ import annotations

import asyncio

import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import nexus_limits as nl

KEY = {"x-api-key": "sk-1"}


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/", lambda request: PlainTextResponse("hi"))])


def flask_app() -> Flask:
    app = Flask(__name__)
    app.add_url_rule("/", "index", lambda: "hi")
    return app


@pytest.mark.parametrize("make", [starlette_app, flask_app], ids=["asgi", "wsgi"])
def test_middleware_wraps_either_kind_of_app(make):
    limiter = nl.FixedWindow("2/minute")
    app = make()
    if isinstance(app, Flask):
        app.wsgi_app = limiter.middleware(app.wsgi_app, key="header:x-api-key")  # Flask's way
        client = app.test_client()
        statuses = [client.get("/", headers=KEY).status_code for _ in range(3)]
    else:
        with TestClient(limiter.middleware(app, key="header:x-api-key")) as client:
            statuses = [client.get("/", headers=KEY).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert limiter.get_limit("sk-1") == (False, 0)
    limiter.reset("sk-1")
    assert limiter.get_limit("sk-1") == (True, 2)


def test_options_reach_the_adapter():
    limiter = nl.TokenBucket("1/minute")
    with TestClient(limiter.middleware(starlette_app(), key="header:x-api-key", exempt=["/"])) as client:
        assert [client.get("/", headers=KEY).status_code for _ in range(3)] == [200, 200, 200]


def test_concurrency_and_composite_have_it_too():
    for limiter in (nl.Concurrency(1), nl.Composite([nl.TokenBucket("5/s"), nl.FixedWindow("9/minute")])):
        with TestClient(limiter.middleware(starlette_app(), key="header:x-api-key")) as client:
            assert client.get("/", headers=KEY).status_code == 200


def test_an_asyncio_limiter_wraps_an_asgi_app_and_refuses_a_wsgi_one(async_redis_client):
    import nexus_limits.redis.asyncio as nla

    async def main():
        limiter = nla.FixedWindow(async_redis_client(), "1/minute", prefix="seed")
        with pytest.raises(TypeError, match="ASGI"):
            limiter.middleware(flask_app().wsgi_app)
        return limiter.middleware(starlette_app(), key="header:x-api-key")

    wrapped = asyncio.run(main())
    with TestClient(wrapped) as client:
        assert [client.get("/", headers=KEY).status_code for _ in range(2)] == [200, 429]


def test_something_that_is_no_app_is_a_type_error():
    with pytest.raises(TypeError, match="ASGI or a WSGI"):
        nl.TokenBucket("1/s").middleware(42)
