"""The response policy as data: the brief's defaults, overrides from a sink's settings, and Retry-After parsing."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from consumers.policy import (
    ACTIONS,
    DEFAULT_POLICY,
    METHODS,
    Action,
    Decision,
    ResponsePolicy,
    Rule,
    parse_retry_after,
)
from topics.errors import ConfigError, OrderbusError

# --- defaults -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_done(status: int) -> None:
    assert DEFAULT_POLICY.decide(status) == Decision("done", "2xx")


def test_409_to_a_create_is_a_duplicate_and_to_an_update_or_a_cancel_a_conflict_to_look_at() -> None:
    # Review (downstream owner): a 409 to a PUT (a version conflict, "already shipped") counted as delivered lost the
    # update without a trace.
    assert DEFAULT_POLICY.decide(409, "POST") == Decision("duplicate", "409-already-exists")
    assert DEFAULT_POLICY.decide(409, "PUT") == Decision("dead_letter", "409-conflict")
    assert DEFAULT_POLICY.decide(409, "DELETE") == Decision("dead_letter", "409-conflict")
    no_change = DEFAULT_POLICY.with_overrides({"PUT 409": "duplicate"})  # a system whose 409 means "no change"
    assert no_change.decide(409, "PUT") == Decision("duplicate", "override-put-409")


@pytest.mark.parametrize("status", [401, 403])
def test_credentials_pause_the_sink_instead_of_dead_lettering(status: int) -> None:
    assert DEFAULT_POLICY.decide(status) == Decision("pause_auth", "auth")


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504, 599])
def test_temporary_answers_are_retried(status: int) -> None:
    assert DEFAULT_POLICY.decide(status) == Decision("retry", "temporary")


@pytest.mark.parametrize("status", [400, 402, 404, 405, 410, 413, 415, 422, 451, 499])
def test_other_4xx_are_dead_lettered_at_once(status: int) -> None:
    assert DEFAULT_POLICY.decide(status) == Decision("dead_letter", "bad-request")


@pytest.mark.parametrize("status", [100, 101, 199, 300, 301, 304, 399, 600, 0, 999])
def test_a_status_no_rule_covers_is_dead_lettered_as_unmatched(status: int) -> None:
    assert DEFAULT_POLICY.decide(status) == Decision("dead_letter", "unmatched")


@pytest.mark.parametrize("method", METHODS)
def test_every_status_gets_exactly_the_documented_decision(method: str) -> None:
    for status in range(100, 600):
        decision = DEFAULT_POLICY.decide(status, method)
        assert decision.action in ACTIONS
        if 200 <= status <= 299:
            assert decision.action == "done"
        elif status in (408, 425, 429) or status >= 500:
            assert decision.action == "retry"
        elif status in (401, 403):
            assert decision.action == "pause_auth"
        elif status == 409 and method == "POST":
            assert decision.action == "duplicate"
        else:
            assert decision.action == "dead_letter"


def test_timeouts_and_connection_errors_are_retried_under_their_own_rule_names() -> None:
    assert DEFAULT_POLICY.decide_failure("timeout") == Decision("retry", "timeout")
    assert DEFAULT_POLICY.decide_failure("connection") == Decision("retry", "connection-error")


def test_a_request_that_cannot_be_sent_is_dead_lettered_at_once() -> None:
    assert DEFAULT_POLICY.decide_failure("invalid_request") == Decision("dead_letter", "invalid-request")


def test_an_unknown_failure_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown delivery failure 'dns'"):
        DEFAULT_POLICY.decide_failure("dns")  # type: ignore[arg-type]


def test_the_first_matching_rule_wins() -> None:
    policy = ResponsePolicy((Rule("narrow", "retry", (404,)), Rule("wide", "dead_letter", ((400, 499),))))
    assert policy.decide(404) == Decision("retry", "narrow")
    assert policy.decide(405) == Decision("dead_letter", "wide")


def test_an_empty_policy_dead_letters_everything() -> None:
    assert ResponsePolicy(()).decide(200) == Decision("dead_letter", "unmatched")


# --- rules --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "action", "statuses", "message"),
    [
        ("", "done", (200,), "needs a name"),
        ("x", "explode", (200,), "action 'explode' is not one of"),
        ("x", "done", (), "covers no status"),
        ("x", "done", (99,), "99 is not a status code"),
        ("x", "done", (600,), "600 is not a status code"),
        ("x", "done", ((500, 400),), r"\(500, 400\) is not a status code"),
        ("x", "done", ((400, 700),), r"\(400, 700\) is not a status code"),
        ("x", "done", (True,), "True is not a status code"),
    ],
)
def test_a_bad_rule_is_a_config_error_naming_the_rule(name: str, action: str, statuses: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Rule(name, action, statuses)  # type: ignore[arg-type]


def test_rules_cover_single_codes_and_inclusive_ranges() -> None:
    rule = Rule("r", "retry", (418, (500, 502)))
    assert [s for s in range(100, 600) if rule.covers(s)] == [418, 500, 501, 502]


# --- overrides ----------------------------------------------------------------------------------------------


def test_an_override_turns_409_into_a_dead_letter() -> None:
    policy = DEFAULT_POLICY.with_overrides({"409": "dead_letter"})
    assert policy.decide(409) == Decision("dead_letter", "override-409")
    assert policy.decide(404) == Decision("dead_letter", "bad-request")
    assert DEFAULT_POLICY.decide(409, "POST") == Decision("duplicate", "409-already-exists")  # untouched


def test_an_override_makes_404_a_duplicate_for_a_delete_sink() -> None:
    policy = DEFAULT_POLICY.with_overrides({"404": "duplicate"})
    assert policy.decide(404) == Decision("duplicate", "override-404")


def test_a_class_override_covers_the_whole_class_but_codes_still_win() -> None:
    overrides: Mapping[str, Action] = {"4xx": "retry", "400": "dead_letter"}
    policy = DEFAULT_POLICY.with_overrides(overrides)
    assert policy.decide(400) == Decision("dead_letter", "override-400")
    assert policy.decide(404) == Decision("retry", "override-4xx")
    assert policy.decide(401) == Decision("retry", "override-4xx")
    assert policy.decide(500) == Decision("retry", "temporary")


def test_an_override_can_name_the_method_whose_answers_it_decides() -> None:
    # A 409 to a cancel is "cannot, already shipped" at some systems, "already exists" to a create everywhere.
    policy = DEFAULT_POLICY.with_overrides({"DELETE 409": "dead_letter", "put 404": "duplicate"})
    assert policy.decide(409, "DELETE") == Decision("dead_letter", "override-delete-409")
    assert policy.decide(409, "POST") == Decision("duplicate", "409-already-exists")
    assert policy.decide(409) == Decision("dead_letter", "409-conflict"), "no method: only rules for all"
    assert policy.decide(404, "PUT") == Decision("duplicate", "override-put-404")
    assert policy.decide(404, "DELETE") == Decision("dead_letter", "bad-request")


def test_the_most_specific_override_decides_whatever_the_order_of_the_keys() -> None:
    overrides: Mapping[str, Action] = {
        "4xx": "retry",
        "DELETE 4xx": "duplicate",
        "409": "dead_letter",
        "DELETE 409": "done",
    }
    for keys in (overrides, dict(reversed(list(overrides.items())))):
        policy = DEFAULT_POLICY.with_overrides(keys)
        assert policy.decide(409, "DELETE") == Decision("done", "override-delete-409")
        assert policy.decide(409, "PUT") == Decision("dead_letter", "override-409")
        assert policy.decide(404, "DELETE") == Decision("duplicate", "override-delete-4xx")
        assert policy.decide(404, "PUT") == Decision("retry", "override-4xx")


@pytest.mark.parametrize("key", ["PATCH 409", "GET 404", "DEL 409", "POST PUT 409"])
def test_an_override_naming_a_method_the_sinks_do_not_send_is_a_config_error(key: str) -> None:
    with pytest.raises(ConfigError, match=r"names the method '.+'; the sinks send POST, PUT, DELETE"):
        DEFAULT_POLICY.with_overrides({key: "retry"}, setting="sinks.crm.response_policy")


@pytest.mark.parametrize("key", ["DELETE", "DELETE 40", "DELETE409", "DELETE 6xx"])
def test_a_method_override_without_a_status_is_a_config_error(key: str) -> None:
    with pytest.raises(ConfigError, match="is neither a status code"):
        DEFAULT_POLICY.with_overrides({key: "retry"}, setting="sinks.crm.response_policy")


def test_a_rule_for_an_unknown_method_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="method 'PATCH' is not one of"):
        Rule("r", "retry", (409,), "PATCH")


def test_override_keys_are_trimmed_and_case_insensitive() -> None:
    policy = DEFAULT_POLICY.with_overrides({" 5XX ": "dead_letter"})
    assert policy.decide(503) == Decision("dead_letter", "override-5xx")


def test_later_overrides_win_over_earlier_ones() -> None:
    policy = DEFAULT_POLICY.with_overrides({"404": "retry"}).with_overrides({"404": "duplicate"})
    assert policy.decide(404) == Decision("duplicate", "override-404")


def test_no_overrides_keeps_the_same_decisions() -> None:
    assert DEFAULT_POLICY.with_overrides({}) == DEFAULT_POLICY


@pytest.mark.parametrize("key", ["4x", "40", "4000", "600", "099", "6xx", "0xx", "x09", "", "4XX4", "4-xx"])
def test_a_bad_override_key_is_a_config_error_naming_the_key(key: str) -> None:
    with pytest.raises(ConfigError, match=f"sinks.crm.response_policy: key '{key}' is neither"):
        DEFAULT_POLICY.with_overrides({key: "retry"}, setting="sinks.crm.response_policy")


def test_a_bad_override_action_is_a_config_error_naming_key_and_action() -> None:
    with pytest.raises(ConfigError, match=r"response_policy\.409: action 'ignore' is not one of") as caught:
        DEFAULT_POLICY.with_overrides({"409": "ignore"})  # type: ignore[dict-item]
    assert isinstance(caught.value, OrderbusError)


def test_a_non_string_override_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="key 409 must be a string"):
        DEFAULT_POLICY.with_overrides({409: "retry"})  # type: ignore[dict-item]


# --- Retry-After --------------------------------------------------------------------------------------------

NOW = 1_800_000_000.0


def http_date(unix: float) -> str:
    return format_datetime(datetime.fromtimestamp(unix, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", 1.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("007", 7.0),
        ("1.5", 1.5),
        ("86400", 300.0),
        ("9" * 400, 300.0),
    ],
)
def test_delay_seconds_are_read_and_capped(value: str, expected: float) -> None:
    assert parse_retry_after(value, wall_now=NOW, cap=300.0) == expected


@pytest.mark.parametrize(
    "value", [None, "", "   ", "-1", "+5", "1e3", "inf", "nan", "1.", ".5", "5s", "soon", "1,5", "٣", "0", "0.0"]
)
def test_absent_invalid_or_zero_values_are_ignored(value: str | None) -> None:
    assert parse_retry_after(value, wall_now=NOW, cap=300.0) is None


def test_an_imf_fixdate_is_read_relative_to_wall_time() -> None:
    assert parse_retry_after(http_date(NOW + 42), wall_now=NOW, cap=300.0) == 42.0


def test_the_obsolete_rfc_850_and_asctime_date_forms_are_read_too() -> None:
    now = datetime(1994, 11, 6, 8, 49, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", wall_now=now, cap=300.0) == 37.0
    assert parse_retry_after("Sun Nov  6 08:49:37 1994", wall_now=now, cap=300.0) == 37.0


def test_a_date_now_or_in_the_past_is_ignored_and_a_far_date_is_capped() -> None:
    # A server whose clock is behind ours: taken as "now", every request would go again at once, unpaced.
    assert parse_retry_after(http_date(NOW - 3600), wall_now=NOW, cap=300.0) is None
    assert parse_retry_after(http_date(NOW), wall_now=NOW, cap=300.0) is None
    assert parse_retry_after(http_date(NOW + 86400), wall_now=NOW, cap=300.0) == 300.0


@pytest.mark.parametrize(
    "value", ["Sun, 06 Nov 99999 08:49:37 GMT", "Sun, 32 Nov 2026 08:49:37 GMT", "06 Nov 2026", "Someday"]
)
def test_a_broken_date_is_ignored(value: str) -> None:
    assert parse_retry_after(value, wall_now=NOW, cap=300.0) is None


def test_the_cap_must_be_a_finite_non_negative_number() -> None:
    assert parse_retry_after("10", wall_now=NOW, cap=0.0) == 0.0
    with pytest.raises(ValueError, match="cap"):
        parse_retry_after("10", wall_now=NOW, cap=-1.0)
    with pytest.raises(ValueError, match="cap"):
        parse_retry_after("10", wall_now=NOW, cap=float("inf"))
