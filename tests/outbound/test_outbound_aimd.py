"""The AIMD controller: multiplicative decrease on a throttle (once per cooldown),
additive increase while healthy (once per interval), always within [floor, ceiling]."""

from __future__ import annotations

import math
import threading

import pytest

import nexus_limits as nl
from nexus_limits.outbound import AIMD


def make(**kw):
    clock = nl.ManualClock(0)
    options = {"ceiling": 100, "floor": 10, "increase": 5, "decrease": 0.5, "clock": clock}
    options.update(kw)
    return AIMD(**options), clock


def test_starts_at_the_ceiling_and_halves_on_a_throttle():
    aimd, _ = make()
    assert aimd.value == 100
    assert aimd.throttle() == 50
    assert aimd.stats()["decreases"] == 1


def test_one_overload_counts_once_within_the_cooldown():
    aimd, clock = make(cooldown=1.0)
    aimd.throttle()
    for _ in range(20):
        aimd.throttle()
    assert aimd.value == 50
    clock.advance(1.0)
    assert aimd.throttle() == 25
    stats = aimd.stats()
    assert stats["throttles"] == 22 and stats["decreases"] == 2


def test_never_below_the_floor():
    aimd, clock = make(cooldown=0.0)
    for _ in range(50):
        aimd.throttle()
        clock.advance(0.1)
    assert aimd.value == 10
    assert aimd.stats()["decreases"] == 4  # 50, 25, 12.5, 10


def test_increases_once_per_interval_up_to_the_ceiling():
    aimd, clock = make(start=20, interval=1.0)
    for _ in range(100):  # a burst of successes in one instant: one step
        aimd.success()
    assert aimd.value == 25
    for _ in range(30):
        clock.advance(1.0)
        aimd.success()
    assert aimd.value == 100
    clock.advance(1.0)
    assert aimd.success() == 100


def test_no_increase_until_an_interval_after_a_decrease():
    aimd, clock = make(interval=2.0)
    aimd.throttle()
    clock.advance(1.0)
    assert aimd.success() == 50
    clock.advance(1.0)
    assert aimd.success() == 55


def test_observe_reads_statuses_and_low_remaining_headers():
    aimd, _ = make(cooldown=0.0, interval=0.0)
    assert aimd.observe(429) == 50
    assert aimd.observe(529) == 25  # Anthropic's overloaded
    assert aimd.observe(503) == 12.5
    assert aimd.observe(200) == 17.5
    assert aimd.observe(400) == 17.5  # a bad request says nothing about load
    assert aimd.observe(500) == 17.5
    low = {"x-ratelimit-limit-tokens": "30000", "x-ratelimit-remaining-tokens": "100"}
    assert aimd.observe(200, low) == 10  # max(10, 8.75)
    anthropic_low = {
        "anthropic-ratelimit-output-tokens-limit": "8000",
        "anthropic-ratelimit-output-tokens-remaining": "10",
    }
    healthy = {"x-ratelimit-limit-tokens": "30000", "x-ratelimit-remaining-tokens": "29000"}
    assert aimd.observe(200, healthy) == 15
    assert aimd.observe(200, anthropic_low) == 10


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-limit-tokens": "nan", "x-ratelimit-remaining-tokens": "-5"},
        {"x-ratelimit-limit-tokens": "0", "x-ratelimit-remaining-tokens": "0"},
        {"x-ratelimit-limit-tokens": "1e400", "x-ratelimit-remaining-tokens": "1"},
        {"x-ratelimit-remaining-tokens": "0"},
        {"anthropic-ratelimit-requests-limit": "x" * 10_000},
    ],
)
def test_garbage_headers_are_not_a_throttle(headers):
    aimd, _ = make(interval=0.0)
    aimd.throttle()
    assert aimd.observe(200, headers) == 55


def test_on_change_is_told_each_change_and_only_changes():
    seen = []
    aimd, _ = make(on_change=seen.append, cooldown=0.0, interval=0.0)
    aimd.success()  # at the ceiling: no change
    aimd.throttle()
    aimd.success()
    assert seen == [50, 55]


def test_copy_has_the_settings_and_fresh_state():
    aimd, _ = make()
    aimd.throttle()
    twin = aimd.copy()
    assert twin.value == 100 and twin.ceiling == 100 and twin.floor == 10 and twin.decrease == 0.5


@pytest.mark.parametrize(
    "kw",
    [
        {"ceiling": 0},
        {"ceiling": -1},
        {"ceiling": math.inf},
        {"ceiling": math.nan},
        {"ceiling": True},
        {"ceiling": "100"},
        {"floor": 200},
        {"floor": 0},
        {"decrease": 1.0},
        {"decrease": 0},
        {"decrease": 2},
        {"increase": -1},
        {"interval": -1},
        {"cooldown": math.nan},
        {"low_water": 1.0},
        {"start": 5},
        {"start": 500},
    ],
)
def test_bad_settings_are_refused_with_the_name(kw):
    options = {"ceiling": 100, "floor": 10}
    options.update(kw)
    with pytest.raises(ValueError) as info:
        AIMD(**options)
    assert next(iter(kw)) in str(info.value)


def test_bad_status_and_callables():
    aimd, _ = make()
    with pytest.raises(TypeError):
        aimd.observe("429")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        AIMD(10, on_change=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        AIMD(10, clock="now")


def test_defaults_and_a_plain_function_clock():
    now = [0.0]
    aimd = AIMD(60, clock=lambda: now[0])
    assert (aimd.floor, aimd.increase, aimd.decrease) == (1.0, 3.0, 0.5)
    aimd.throttle()
    now[0] += 1.0
    assert aimd.success() == 33
    assert "AIMD(value=33" in repr(aimd)


def test_threads_never_leave_the_bounds():
    aimd = AIMD(100, 10, 5, interval=0.0, cooldown=0.0)
    errors = []

    def hammer(n: int) -> None:
        for i in range(2000):
            value = aimd.throttle() if (i + n) % 3 == 0 else aimd.success()
            if not 10 <= value <= 100:
                errors.append(value)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    stats = aimd.stats()
    assert stats["successes"] + stats["throttles"] == 8000
