"""The circuit breaker on a fake clock: opening on a failure ratio, half-open probes, doubling pauses, callbacks."""

from __future__ import annotations

import pytest

from consumers.circuit import Circuit, CircuitState
from consumers.clock import FakeClock
from topics.errors import ConfigError

START = 1000.0


class Changes:
    """Records on_change calls."""

    def __init__(self) -> None:
        self.seen: list[tuple[CircuitState, CircuitState]] = []

    def __call__(self, old: CircuitState, new: CircuitState) -> None:
        self.seen.append((old, new))


def state_of(circuit: Circuit) -> CircuitState:
    """The state, read through a call: mypy would otherwise narrow `circuit.state` across clock moves."""
    return circuit.state


def feed(circuit: Circuit, outcomes: str) -> None:
    """Record outcomes written as a string: "s" success, "f" failure."""
    for outcome in outcomes:
        assert circuit.allow()
        circuit.record(outcome == "s")


def opened(clock: FakeClock, **kwargs: float) -> tuple[Circuit, Changes]:
    changes = Changes()
    circuit = Circuit(clock, on_change=changes, **kwargs)  # type: ignore[arg-type]
    feed(circuit, "f" * 10)
    assert state_of(circuit) == "open"
    return circuit, changes


def test_a_new_circuit_is_closed_and_allows_calls() -> None:
    circuit = Circuit(FakeClock())
    assert state_of(circuit) == "closed"
    assert circuit.allow()
    assert circuit.opened_until is None
    assert circuit.failure_ratio == 0.0


def test_it_does_not_open_before_min_calls_were_seen() -> None:
    circuit = Circuit(FakeClock(), min_calls=10)
    feed(circuit, "f" * 9)
    assert state_of(circuit) == "closed"
    feed(circuit, "f")
    assert state_of(circuit) == "open"


def test_it_opens_when_the_failure_ratio_reaches_the_threshold() -> None:
    clock = FakeClock(start=START)
    circuit = Circuit(clock, window=20, min_calls=10, failure_ratio=0.5)
    feed(circuit, "sfsfsfsfs")
    assert state_of(circuit) == "closed"  # 9 calls: below min_calls
    feed(circuit, "f")  # 5 of 10 failed
    assert state_of(circuit) == "open"
    assert circuit.opened_until == START + 30
    assert not circuit.allow()


def test_a_ratio_below_the_threshold_keeps_it_closed() -> None:
    circuit = Circuit(FakeClock(), window=20, min_calls=10, failure_ratio=0.5)
    feed(circuit, "ssf" * 20)
    assert state_of(circuit) == "closed"
    assert circuit.failure_ratio == pytest.approx(7 / 20)


def test_only_the_last_window_calls_count() -> None:
    circuit = Circuit(FakeClock(), window=10, min_calls=10, failure_ratio=0.5)
    feed(circuit, "ffff" + "s" * 10)  # the old failures slid out of the window
    assert circuit.failure_ratio == 0.0
    feed(circuit, "ffff")
    assert circuit.failure_ratio == pytest.approx(0.4)
    assert state_of(circuit) == "closed"
    feed(circuit, "f")
    assert state_of(circuit) == "open"


async def test_after_open_for_it_turns_half_open_and_admits_one_probe() -> None:
    clock = FakeClock(start=START)
    circuit, changes = opened(clock)
    await clock.advance(29.9)
    assert state_of(circuit) == "open"
    assert not circuit.allow()
    await clock.advance(0.1)
    assert state_of(circuit) == "half_open"
    assert circuit.opened_until is None
    assert circuit.allow()
    assert not circuit.allow()  # one probe at a time
    assert changes.seen == [("closed", "open"), ("open", "half_open")]


async def test_a_successful_probe_closes_it_with_a_fresh_window() -> None:
    clock = FakeClock(start=START)
    circuit, changes = opened(clock)
    await clock.advance(30)
    assert circuit.allow()
    circuit.record(True, probe=True)
    assert state_of(circuit) == "closed"
    assert circuit.failure_ratio == 0.0
    feed(circuit, "f" * 9)  # the old failures are forgotten: min_calls counts again from zero
    assert state_of(circuit) == "closed"
    assert changes.seen[-1] == ("half_open", "closed")


async def test_a_failed_probe_reopens_it_for_twice_as_long_up_to_the_maximum() -> None:
    clock = FakeClock(start=START)
    circuit, changes = opened(clock, open_for=30.0, max_open_for=100.0)
    pauses = []
    for _ in range(4):
        await clock.advance(circuit.open_for)
        assert circuit.allow()
        circuit.record(False, probe=True)
        assert state_of(circuit) == "open"
        pauses.append(circuit.open_for)
        assert circuit.opened_until == clock.now() + circuit.open_for
    assert pauses == [60.0, 100.0, 100.0, 100.0]
    assert changes.seen[-2:] == [("open", "half_open"), ("half_open", "open")]


async def test_closing_resets_the_pause_to_its_start() -> None:
    clock = FakeClock(start=START)
    circuit, _ = opened(clock)
    await clock.advance(30)
    assert circuit.allow()
    circuit.record(False, probe=True)
    assert circuit.open_for == 60
    await clock.advance(60)
    assert circuit.allow()
    circuit.record(True, probe=True)
    assert circuit.open_for == 30
    feed(circuit, "f" * 10)
    assert circuit.opened_until == clock.now() + 30


async def test_several_probes_must_all_succeed_to_close() -> None:
    clock = FakeClock(start=START)
    circuit, _ = opened(clock, probes=3)
    await clock.advance(30)
    assert [circuit.allow() for _ in range(4)] == [True, True, True, False]
    circuit.record(True, probe=True)
    circuit.record(True, probe=True)
    assert state_of(circuit) == "half_open"
    assert not circuit.allow()  # two slots used up by successes, one probe still out
    circuit.record(True, probe=True)
    assert state_of(circuit) == "closed"


async def test_one_failed_probe_of_several_reopens_at_once() -> None:
    clock = FakeClock(start=START)
    circuit, _ = opened(clock, probes=3)
    await clock.advance(30)
    assert circuit.allow()
    assert circuit.allow()
    circuit.record(True, probe=True)
    circuit.record(False, probe=True)
    assert state_of(circuit) == "open"


async def test_a_released_probe_frees_its_slot() -> None:
    clock = FakeClock(start=START)
    circuit, _ = opened(clock)
    await clock.advance(30)
    assert circuit.allow()
    assert not circuit.allow()
    circuit.release()
    assert state_of(circuit) == "half_open"
    assert circuit.allow()


def test_release_in_closed_state_changes_nothing() -> None:
    circuit = Circuit(FakeClock())
    circuit.release()
    assert state_of(circuit) == "closed"
    assert circuit.allow()


async def test_late_outcomes_while_open_are_ignored() -> None:
    clock = FakeClock(start=START)
    circuit, changes = opened(clock)
    circuit.record(True)
    circuit.record(False)
    assert state_of(circuit) == "open"
    assert circuit.opened_until == START + 30
    assert changes.seen == [("closed", "open")]


async def test_outcomes_in_half_open_without_a_probe_out_are_ignored() -> None:
    clock = FakeClock(start=START)
    circuit, _ = opened(clock)
    await clock.advance(30)
    circuit.record(True)  # a call started before the circuit opened
    circuit.record(False)
    assert state_of(circuit) == "half_open"
    assert circuit.allow()


async def test_a_late_call_answered_while_the_probe_is_out_decides_nothing() -> None:
    clock = FakeClock(start=START)
    circuit, changes = opened(clock)
    await clock.advance(30)
    assert circuit.allow()  # the probe is sent
    circuit.record(False)  # a call sent before the circuit opened times out now (request_timeout > open_for)
    assert state_of(circuit) == "half_open", "not reopened, nor open_for doubled, by an old call"
    assert circuit.open_for == 30
    circuit.record(True, probe=True)
    assert state_of(circuit) == "closed"
    assert changes.seen[-1] == ("half_open", "closed")


async def test_no_callback_is_needed_and_a_callback_may_be_set_later() -> None:
    clock = FakeClock(start=START)
    circuit = Circuit(clock, window=1, min_calls=1, failure_ratio=1.0, open_for=5.0)
    feed(circuit, "f")
    assert state_of(circuit) == "open"
    changes = Changes()
    circuit.on_change = changes
    await clock.advance(5)
    assert state_of(circuit) == "half_open"
    assert changes.seen == [("open", "half_open")]


def test_an_open_for_longer_than_the_maximum_is_kept_not_cut() -> None:
    clock = FakeClock(start=START)
    circuit = Circuit(clock, window=1, min_calls=1, failure_ratio=1.0, open_for=600.0)
    feed(circuit, "f")
    assert circuit.opened_until == START + 600


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 0}, "circuit window must be"),
        ({"min_calls": 0}, "circuit min_calls must be between 1 and the window"),
        ({"window": 5, "min_calls": 6}, r"circuit min_calls must be between 1 and the window \(5\)"),
        ({"failure_ratio": 0.0}, "circuit failure_ratio must be in"),
        ({"failure_ratio": 1.5}, "circuit failure_ratio must be in"),
        ({"open_for": 0.0}, "circuit open_for must be"),
        ({"max_open_for": float("inf")}, "circuit max_open_for must be"),
        ({"probes": 0}, "circuit probes must be"),
    ],
)
def test_bad_settings_are_config_errors(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Circuit(FakeClock(), **kwargs)  # type: ignore[arg-type]
