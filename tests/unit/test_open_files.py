"""The limit of open files against the settings' need (`daemon.open_files`)."""

from __future__ import annotations

import resource

import pytest

from daemon import open_files
from daemon.connection_gate import refusals_held
from daemon.settings import load_settings
from topics.errors import ConfigError


class Limits:
    def __init__(self, soft: int, hard: int) -> None:
        self.now = (soft, hard)
        self.set: list[tuple[int, int]] = []

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.now

    def set_limits(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.set.append(limits)
        self.now = limits


def test_the_need_is_the_listener_the_sinks_and_the_reserve(no_orderbus_env: pytest.MonkeyPatch) -> None:
    env = {
        "ORDERBUS_INGEST__MAX_CONNECTIONS": "500",
        "ORDERBUS_SINKS__CRM__ENABLED": "true",
        "ORDERBUS_SINKS__CRM__MAX_IN_FLIGHT": "100",
        "ORDERBUS_SINKS__SHIPPING__ENABLED": "true",
        "ORDERBUS_SINKS__SHIPPING__MAX_IN_FLIGHT": "30",
        "ORDERBUS_SINKS__ACCOUNTING__MAX_IN_FLIGHT": "7",  # not enabled: not counted
    }
    settings = load_settings(None, env=env)
    assert sorted(settings.enabled_sinks()) == ["crm", "shipping"]
    assert open_files.needed(settings) == (
        500 + refusals_held(500) + 100 + 30 + open_files.RESERVE,
        "ingest.max_connections, sinks.*.max_in_flight",
    )
    without_ingest = load_settings(None, env={**env, "ORDERBUS_INGEST__ENABLED": "false"})
    assert open_files.needed(without_ingest) == (100 + 30 + open_files.RESERVE, "sinks.*.max_in_flight")


def test_a_soft_limit_below_the_need_is_raised_to_it() -> None:
    limits = Limits(1024, 524_288)
    assert open_files.ensure(2048, "ingest.max_connections", get=limits.get, set_limits=limits.set_limits) == (
        1024,
        524_288,
    )
    assert limits.set == [(2048, 524_288)]


def test_a_limit_that_suffices_is_left_alone() -> None:
    for soft, hard in ((4096, 4096), (resource.RLIM_INFINITY, resource.RLIM_INFINITY)):
        limits = Limits(soft, hard)
        assert open_files.ensure(2048, "ingest.max_connections", get=limits.get, set_limits=limits.set_limits) is None
        assert limits.set == []
    unlimited_hard = Limits(1024, resource.RLIM_INFINITY)
    assert open_files.ensure(
        2048, "ingest.max_connections", get=unlimited_hard.get, set_limits=unlimited_hard.set_limits
    ) == (
        1024,
        resource.RLIM_INFINITY,
    )


def test_a_hard_limit_below_the_need_names_the_settings_and_the_limit() -> None:
    limits = Limits(1024, 1024)
    with pytest.raises(ConfigError) as caught:
        open_files.ensure(
            2048, "ingest.max_connections, sinks.*.max_in_flight", get=limits.get, set_limits=limits.set_limits
        )
    message = str(caught.value)
    assert message.startswith("ingest.max_connections, sinks.*.max_in_flight: the daemon may hold 2048")
    assert "may open 1024" in message
    assert "LimitNOFILE=" in message
    assert limits.set == []


def test_a_system_that_refuses_the_raise_is_a_config_error_not_a_traceback() -> None:
    def refuse(which: int, limits: tuple[int, int]) -> None:
        raise ValueError("current limit exceeds maximum limit")

    with pytest.raises(ConfigError, match=r"^sinks\.\*\.max_in_flight: .* may open 256 \(current limit exceeds"):
        open_files.ensure(2048, "sinks.*.max_in_flight", get=Limits(256, resource.RLIM_INFINITY).get, set_limits=refuse)


@pytest.mark.parametrize(
    ("value", "said"),
    [("8", "greater than or equal to 16 (got '8')"), ("many", "a valid integer")],
)
def test_a_bad_connection_limit_is_refused_naming_the_setting(
    no_orderbus_env: pytest.MonkeyPatch, value: str, said: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env={"ORDERBUS_INGEST__MAX_CONNECTIONS": value})
    assert "ingest.max_connections: " in str(caught.value)
    assert said in str(caught.value)
    assert "(set by ORDERBUS_INGEST__MAX_CONNECTIONS)" in str(caught.value)
