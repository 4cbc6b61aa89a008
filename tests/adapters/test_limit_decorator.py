"""``@nl.limit``: key and cost callables get the call's arguments by name, however the
function is called; the exception carries what a web handler needs."""

from __future__ import annotations

import asyncio

import pytest

import nexus_limits as nl
from nexus_limits.adapters.decorators import exceeded_answer, merge_headers


def one_per_minute(clock):
    return nl.FixedWindow("1/minute", clock=clock)


def test_key_by_name_positional_or_keyword(clock):
    @nl.limit(one_per_minute(clock), key=lambda user: user)
    def fetch(user, fmt="json"):
        return (user, fmt)

    assert fetch(user="ann") == ("ann", "json")
    with pytest.raises(nl.RateLimitExceeded) as caught:
        fetch("ann", "csv")
    assert caught.value.key == "ann"
    with pytest.raises(nl.RateLimitExceeded):
        fetch(fmt="xml", user="ann")
    assert fetch("bob") == ("bob", "json")


def test_key_reads_defaults_keyword_only_and_several_parameters(clock):
    seen = []

    @nl.limit(one_per_minute(clock), key=lambda org, region: seen.append((org, region)) or f"{org}/{region}")
    def deploy(org, *, region="eu", dry_run=False):
        return org

    deploy("acme")
    deploy(org="acme", region="us")
    with pytest.raises(nl.RateLimitExceeded):
        deploy("acme", region="eu", dry_run=True)
    assert seen == [("acme", "eu"), ("acme", "us"), ("acme", "eu")]


def test_the_readme_form_and_var_args(clock):
    @nl.limit(one_per_minute(clock), key=lambda user, *_: user)
    def export(user, fmt):
        return fmt

    assert export("ann", "csv") == "csv"
    with pytest.raises(nl.RateLimitExceeded):
        export(user="ann", fmt="csv")

    @nl.limit(one_per_minute(clock), key=lambda *args, **kwargs: kwargs.get("user", args[0] if args else None))
    def legacy(user):
        return user

    assert legacy("ann") == "ann" and legacy(user="bob") == "bob"
    with pytest.raises(nl.RateLimitExceeded):
        legacy(user="ann")


def test_key_with_var_keyword_gets_everything_by_name(clock):
    @nl.limit(one_per_minute(clock), key=lambda **call: f"{call['user']}:{call['fmt']}")
    def export(user, fmt="csv"):
        return fmt

    export("ann")
    with pytest.raises(nl.RateLimitExceeded):
        export(user="ann", fmt="csv")
    export("ann", "json")


def test_function_with_var_keyword(clock):
    @nl.limit(one_per_minute(clock), key=lambda tenant: tenant)
    def handler(**fields):
        return fields

    handler(tenant="t1", x=1)
    with pytest.raises(nl.RateLimitExceeded):
        handler(tenant="t1")
    with pytest.raises(TypeError, match="takes 'tenant', which this call of .*handler did not pass"):
        handler(x=1)


def test_methods_and_constants_and_no_argument_keys(clock):
    class Client:
        @nl.limit(nl.FixedWindow("2/minute", clock=clock), key=lambda self, account: account)
        def get(self, account):
            return account

    c = Client()
    assert c.get("a") == "a" and c.get(account="a") == "a"
    with pytest.raises(nl.RateLimitExceeded):
        c.get("a")

    @nl.limit(one_per_minute(clock), key=lambda: "global")
    def ping(n):
        return n

    assert ping(1) == 1
    with pytest.raises(nl.RateLimitExceeded):
        ping(n=2)


def test_cost_by_name_and_positional_only(clock):
    @nl.limit(nl.TokenBucket("10/minute", clock=clock), key="k", cost=lambda n: n)
    def work(n, /, label=""):
        return n

    assert work(6) == 6
    with pytest.raises(nl.RateLimitExceeded):
        work(5)

    def first(a, /):
        return a

    @nl.limit(one_per_minute(clock), key=first)
    def two(a, b):
        return b

    assert two(b=2, a="x") == 2
    with pytest.raises(nl.RateLimitExceeded):
        two("x", 3)


def test_a_key_naming_an_unknown_parameter_fails_at_decoration():
    with pytest.raises(TypeError, match=r"key takes 'usr', but .*fetch\(user\) has no parameter of that name"):

        @nl.limit(nl.TokenBucket("1/s"), key=lambda usr: usr)
        def fetch(user):
            return user

    with pytest.raises(TypeError, match="cost takes 'size'"):

        @nl.limit(nl.TokenBucket("1/s"), cost=lambda size: size)
        def upload(data):
            return data


def test_a_call_that_does_not_fit_the_function_raises_its_own_type_error(clock):
    @nl.limit(one_per_minute(clock), key=lambda user: user)
    def fetch(user):
        return user

    with pytest.raises(TypeError, match="missing a required argument: 'user'"):
        fetch()
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        fetch("a", other=1)
    assert fetch("a") == "a", "nothing was charged by the bad calls"


def test_async_functions_bind_by_name_too(clock):
    @nl.limit(one_per_minute(clock), key=lambda user: user)
    async def fetch(user, fmt="json"):
        return user

    @nl.limit(nl.TokenBucket("1/s", clock=clock), key=lambda user: user, wait=True, timeout=0.5)
    async def patient(user):
        return user

    async def main():
        assert await fetch(user="ann") == "ann"
        with pytest.raises(nl.RateLimitExceeded):
            await fetch("ann")
        assert await patient(user="ann") == "ann"
        with pytest.raises(nl.RateLimitExceeded) as caught:
            await patient("ann")
        return caught.value

    error = asyncio.run(main())
    assert error.policy == "patient" and error.limiter is not None


def test_the_exception_describes_the_policy_for_a_429(clock):
    limiter = nl.FixedWindow("3/minute", clock=clock)

    @nl.limit(limiter, key=lambda user: user, cost=3)
    def search(user):
        return user

    search("ann")
    with pytest.raises(nl.RateLimitExceeded) as caught:
        search("ann")
    error = caught.value
    assert error.limiter is limiter and error.policy == "search"
    headers, body = exceeded_answer(error)
    assert dict(headers) == {
        "Content-Type": "application/problem+json",
        "RateLimit-Policy": '"search";q=3;w=60',
        "RateLimit": '"search";r=0;t=60',
        "X-RateLimit-Limit": "3",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "60",
        "Retry-After": "60",
    }
    assert b'"detail": "Too many requests; retry after 60 s"' in body

    @nl.limit(limiter, key="k", cost=4)
    def too_big():
        return None

    with pytest.raises(nl.RateLimitExceeded) as caught:
        too_big()
    headers, body = exceeded_answer(caught.value)
    assert "Retry-After" not in dict(headers), "never admissible: no retry time to promise"
    assert b'"detail": "Too many requests"' in body

    # An acquire() of the caller's own, with no decorator: still a complete answer.
    with pytest.raises(nl.RateLimitExceeded) as caught:
        nl.TokenBucket("1/minute", clock=clock).acquire("k", cost=2)
    headers, _ = exceeded_answer(caught.value)
    assert dict(headers)["RateLimit-Policy"] == '"default";q=1'


def test_merge_headers():
    a = [("RateLimit-Policy", '"a";q=5;w=60'), ("RateLimit", '"a";r=4;t=60'), ("X-RateLimit-Limit", "5")]
    a += [("X-RateLimit-Remaining", "4"), ("X-RateLimit-Reset", "60")]
    b = [("Content-Type", "application/problem+json"), ("RateLimit-Policy", '"b";q=2;w=1')]
    b += [("RateLimit", '"b";r=0;t=1'), ("X-RateLimit-Limit", "2"), ("X-RateLimit-Remaining", "0")]
    b += [("X-RateLimit-Reset", "1"), ("Retry-After", "1")]
    merged = merge_headers([a, b])
    assert merged == [
        ("RateLimit-Policy", '"a";q=5;w=60, "b";q=2;w=1'),
        ("RateLimit", '"a";r=4;t=60, "b";r=0;t=1'),
        ("X-RateLimit-Limit", "2"),
        ("X-RateLimit-Remaining", "0"),
        ("X-RateLimit-Reset", "1"),
        ("Retry-After", "1"),
    ]
    assert merge_headers([a]) == a
    assert merge_headers([b, b])[-1] == ("Retry-After", "1")


@pytest.mark.parametrize("wait", [False, True])
def test_a_concurrency_lease_is_held_for_the_call_and_released_after(wait):
    one = nl.Concurrency(1)
    seen = []

    @nl.limit(one, key="job", wait=wait, timeout=0.1)
    def work():
        seen.append(one.try_acquire("job"))  # the decorator holds the one place
        return "done"

    assert work() == "done"
    assert seen == [None]
    assert one.try_acquire("job"), "released once the call is over"


@pytest.mark.parametrize("wait", [False, True])
def test_an_async_call_holds_its_concurrency_lease_too(wait):
    one = nl.Concurrency(1)
    seen = []

    @nl.limit(one, key="job", wait=wait, timeout=0.1)
    async def work():
        seen.append(one.try_acquire("job"))
        return "done"

    assert asyncio.run(work()) == "done"
    assert seen == [None]
    assert one.try_acquire("job")
