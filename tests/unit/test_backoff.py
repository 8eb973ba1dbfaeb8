"""Backoff: full jitter under an exponential, capped ceiling; the two limits; Retry-After as a floor."""

from __future__ import annotations

import random

import pytest

from consumers.backoff import Backoff
from topics.errors import ConfigError


def test_the_defaults_are_the_documented_ones() -> None:
    assert Backoff() == Backoff(base=0.5, cap=60.0, max_attempts=12, max_elapsed=3600.0)


def test_the_ceiling_doubles_from_base_and_stops_at_the_cap() -> None:
    backoff = Backoff(base=0.5, cap=60.0)
    assert [backoff.ceiling(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 32, 60, 60]


def test_a_huge_attempt_number_neither_overflows_nor_passes_the_cap() -> None:
    backoff = Backoff(base=3.0, cap=60.0)
    assert backoff.ceiling(10_000) == 60.0
    assert 0 <= backoff.delay(10**9, random.Random(1)) <= 60.0


def test_attempts_count_from_one() -> None:
    with pytest.raises(ValueError, match="counted from 1"):
        Backoff().delay(0, random.Random(1))


@pytest.mark.parametrize("attempt", [1, 2, 5, 8, 20])
def test_full_jitter_spreads_delays_over_the_whole_range_up_to_the_ceiling(attempt: int) -> None:
    backoff = Backoff()
    rng = random.Random(attempt)
    ceiling = backoff.ceiling(attempt)
    delays = [backoff.delay(attempt, rng) for _ in range(2000)]
    assert all(0.0 <= d <= ceiling for d in delays)
    assert min(delays) < 0.05 * ceiling  # full jitter reaches near zero ...
    assert max(delays) > 0.95 * ceiling  # ... and near the ceiling
    assert 0.45 * ceiling < sum(delays) / len(delays) < 0.55 * ceiling


def test_the_same_seed_gives_the_same_delays() -> None:
    backoff = Backoff()
    first = [backoff.delay(n, random.Random(7)) for n in range(1, 8)]
    second = [backoff.delay(n, random.Random(7)) for n in range(1, 8)]
    assert first == second


def test_exhausted_after_max_attempts() -> None:
    backoff = Backoff(max_attempts=3, max_elapsed=3600.0)
    assert not backoff.exhausted(2, first_attempt_at=0.0, now=10.0)
    assert backoff.exhausted(3, first_attempt_at=0.0, now=10.0)


def test_exhausted_after_max_elapsed_whatever_the_attempts() -> None:
    backoff = Backoff(max_attempts=100, max_elapsed=60.0)
    assert not backoff.exhausted(1, first_attempt_at=1000.0, now=1059.9)
    assert backoff.exhausted(1, first_attempt_at=1000.0, now=1060.0)


def test_retry_at_is_now_plus_the_jittered_delay() -> None:
    backoff = Backoff(base=1.0, cap=8.0)
    expected = backoff.delay(3, random.Random(5))
    assert backoff.retry_at(3, now=500.0, rng=random.Random(5)) == 500.0 + expected


def test_retry_after_is_a_floor_never_earlier_than_the_server_asked() -> None:
    backoff = Backoff(base=1.0, cap=8.0)
    for seed in range(200):
        assert backoff.retry_at(4, now=500.0, rng=random.Random(seed), floor=30.0) == 530.0


def test_a_longer_jittered_delay_wins_over_a_short_retry_after() -> None:
    backoff = Backoff(base=100.0, cap=100.0)
    rng = random.Random(3)
    expected = Backoff(base=100.0, cap=100.0).delay(1, random.Random(3))
    assert expected > 1.0
    assert backoff.retry_at(1, now=0.0, rng=rng, floor=1.0) == expected


def test_the_jitter_is_drawn_even_when_the_floor_wins() -> None:
    backoff = Backoff()
    with_floor, without_floor = random.Random(9), random.Random(9)
    backoff.retry_at(1, now=0.0, rng=with_floor, floor=1000.0)
    backoff.retry_at(1, now=0.0, rng=without_floor)
    assert with_floor.random() == without_floor.random()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base": 0.0}, "backoff.base must be"),
        ({"base": float("nan")}, "backoff.base must be"),
        ({"cap": 0.1}, r"backoff.cap must be a number >= backoff.base \(0.5\)"),
        ({"cap": float("inf")}, "backoff.cap must be"),
        ({"max_attempts": 0}, "backoff.max_attempts must be"),
        ({"max_elapsed": 0.0}, "backoff.max_elapsed must be"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Backoff(**kwargs)  # type: ignore[arg-type]
