"""Django's middleware and view decorator, through Django's test client."""

from __future__ import annotations

import django
import pytest
from django.conf import settings

import nexus_limits as nl

LIMITER = nl.FixedWindow("2/minute")
VIEW_LIMITER = nl.FixedWindow("1/minute")

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="tests",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["nexus_limits.adapters.django.RateLimitMiddleware"],
        NEXUS_LIMITS={"limiter": LIMITER, "key": "header:x-api-key", "exempt": ["/health"]},
    )
    django.setup()

from django.http import HttpResponse, JsonResponse  # noqa: E402
from django.test import Client  # noqa: E402
from django.urls import path  # noqa: E402

from nexus_limits.adapters.django import RateLimitMiddleware, ratelimit  # noqa: E402


def index(request):
    return JsonResponse({"ok": True})


@ratelimit(VIEW_LIMITER, key="ip")
def search(request, term):
    return HttpResponse(term)


urlpatterns = [path("", index), path("health", index), path("search/<str:term>", search)]


def test_middleware():
    client = Client()
    statuses = [client.get("/", HTTP_X_API_KEY="k") for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert statuses[0]["RateLimit-Policy"] == '"default";q=2;w=60'
    assert statuses[2]["Content-Type"] == "application/problem+json" and int(statuses[2]["Retry-After"]) >= 1
    assert client.get("/").status_code == 401
    assert all(client.get("/health").status_code == 200 for _ in range(3))


def test_view_decorator():
    LIMITER.reset("k2")
    client = Client()
    assert client.get("/search/cats", HTTP_X_API_KEY="k2").content == b"cats"
    r = client.get("/search/dogs", HTTP_X_API_KEY="k2")
    assert r.status_code == 429 and r.json()["status"] == 429


def test_missing_setting():
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    with override_settings(NEXUS_LIMITS=None), pytest.raises(ImproperlyConfigured, match="NEXUS_LIMITS"):
        RateLimitMiddleware(lambda r: r)
    assert RateLimitMiddleware(lambda r: r, config={"limiter": nl.TokenBucket("1/s")}).limits.limiter is not None
