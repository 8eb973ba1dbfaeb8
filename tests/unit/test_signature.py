"""Standard Webhooks verification and signing: the published test vector, rotation, tampering, time window."""

from __future__ import annotations

import base64
import re

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from daemon.signature import SignatureError, WebhookVerifier, secret_key, sign
from topics.errors import ConfigError, OrderbusError

# The Standard Webhooks reference vector (standard-webhooks/standard-webhooks, libraries/*/tests).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

OTHER_SECRET = "whsec_" + base64.b64encode(b"another key, 24 bytes ok").decode()
NOW = 1_700_000_000


def headers(
    msg_id: str = VECTOR_ID, timestamp: int | str = NOW, signature: str | None = None, *, body: bytes = b"{}"
) -> dict[str, str]:
    if signature is None:
        signature = sign(VECTOR_SECRET, msg_id, int(timestamp), body)
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def verifier(*secrets: str, now: float = NOW, tolerance: float = 300.0) -> WebhookVerifier:
    return WebhookVerifier(secrets or (VECTOR_SECRET,), tolerance=tolerance, clock=lambda: now)


def reason(exc: pytest.ExceptionInfo[SignatureError]) -> str:
    return exc.value.reason


# --- the published vector -------------------------------------------------------------------------------


def test_sign_reproduces_the_standard_webhooks_vector() -> None:
    assert sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE


def test_verify_accepts_the_standard_webhooks_vector() -> None:
    sent = {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TIMESTAMP),
        "webhook-signature": VECTOR_SIGNATURE,
    }
    assert verifier(now=VECTOR_TIMESTAMP).verify(sent, VECTOR_BODY) == VECTOR_ID


def test_the_vector_key_is_the_base64_decoded_secret_not_its_text() -> None:
    # Same bytes, different secret encodings: only the decoded key reproduces the vector.
    raw_text = VECTOR_SECRET.removeprefix("whsec_")
    assert sign(raw_text, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) != VECTOR_SIGNATURE


# --- secrets ----------------------------------------------------------------------------------------------


def test_a_secret_without_prefix_is_used_as_raw_utf8_bytes() -> None:
    raw = "plain-text-key-of-the-shop"
    as_whsec = "whsec_" + base64.b64encode(raw.encode()).decode()
    assert sign(raw, "m", NOW, b"{}") == sign(as_whsec, "m", NOW, b"{}")
    sent = headers(signature=sign(raw, VECTOR_ID, NOW, b"{}"))
    assert verifier(raw).verify(sent, b"{}") == VECTOR_ID


def test_unpadded_whsec_base64_is_accepted() -> None:
    padded = "whsec_" + base64.b64encode(b"sixteen byte key").decode()
    assert padded.endswith("=")
    unpadded = padded.rstrip("=")
    assert sign(unpadded, "m", NOW, b"x") == sign(padded, "m", NOW, b"x")


@pytest.mark.parametrize(
    ("secrets", "expected"),
    [
        pytest.param(["whsec_not*base64!"], "webhook_secrets[0]", id="bad-base64-first"),
        pytest.param([VECTOR_SECRET, "whsec_@@@@"], "webhook_secrets[1]", id="bad-base64-second"),
        pytest.param([VECTOR_SECRET, "whsec_"], "webhook_secrets[1] is empty", id="empty-after-prefix"),
        pytest.param([""], "webhook_secrets[0] is empty", id="empty-raw"),
        pytest.param([], "at least one secret", id="none"),
    ],
)
def test_bad_secrets_fail_at_construction_naming_the_index_not_the_secret(secrets: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)) as exc:
        WebhookVerifier(secrets, clock=lambda: NOW)
    for secret in secrets:
        if secret.removeprefix("whsec_"):
            assert secret.removeprefix("whsec_") not in str(exc.value)


def test_a_single_string_is_not_mistaken_for_a_list_of_secrets() -> None:
    with pytest.raises(ConfigError, match="not a single string"):
        WebhookVerifier(VECTOR_SECRET, clock=lambda: NOW)


def test_repr_does_not_show_secrets() -> None:
    shown = repr(verifier(VECTOR_SECRET, OTHER_SECRET))
    assert "MfKQ9r8" not in shown
    assert "2 secret(s)" in shown


# --- signatures -------------------------------------------------------------------------------------------


def test_signature_error_is_an_orderbus_error_with_a_reason() -> None:
    with pytest.raises(OrderbusError):
        verifier().verify({}, b"")


def test_tampered_body_is_rejected() -> None:
    sent = headers(body=b'{"total": "10.00"}')
    with pytest.raises(SignatureError) as exc:
        verifier().verify(sent, b'{"total": "0.01"}')
    assert reason(exc) == "no v1 signature in webhook-signature matches"


@pytest.mark.parametrize("field", ["webhook-id", "webhook-timestamp"])
def test_tampered_signed_header_is_rejected(field: str) -> None:
    sent = headers()
    sent[field] = "msg_other" if field == "webhook-id" else str(NOW + 1)
    with pytest.raises(SignatureError, match="matches"):
        verifier().verify(sent, b"{}")


def test_wrong_secret_is_rejected() -> None:
    sent = headers(signature=sign(OTHER_SECRET, VECTOR_ID, NOW, b"{}"))
    with pytest.raises(SignatureError, match="matches") as exc:
        verifier(VECTOR_SECRET).verify(sent, b"{}")
    assert sent["webhook-signature"].split(",")[1] not in reason(exc)


def test_rotation_accepts_a_request_signed_with_any_active_secret() -> None:
    both = verifier(OTHER_SECRET, VECTOR_SECRET)
    for secret in (VECTOR_SECRET, OTHER_SECRET):
        assert both.verify(headers(signature=sign(secret, VECTOR_ID, NOW, b"{}")), b"{}") == VECTOR_ID


def test_rotation_accepts_a_sender_that_signs_with_old_and_new_secret() -> None:
    old_and_new = f"{sign(OTHER_SECRET, VECTOR_ID, NOW, b'{}')} {sign(VECTOR_SECRET, VECTOR_ID, NOW, b'{}')}"
    assert verifier(VECTOR_SECRET).verify(headers(signature=old_and_new), b"{}") == VECTOR_ID
    assert verifier(OTHER_SECRET).verify(headers(signature=old_and_new), b"{}") == VECTOR_ID


def test_multiple_signatures_any_valid_v1_entry_is_enough() -> None:
    # Mirrors the reference suite: junk v1, an unknown version, the valid one, junk again.
    good = sign(VECTOR_SECRET, VECTOR_ID, NOW, b"{}")
    junk = "Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
    header = f"v1,{junk} v2,{junk}  {good} v1,not-base64!! v1a,{junk}"
    assert verifier().verify(headers(signature=header), b"{}") == VECTOR_ID


def test_signatures_on_lines_of_their_own_or_joined_by_a_proxy_are_each_tried() -> None:
    # Review (sender rotating its secret): the valid one on a second line, or first of a comma-joined pair, was a 401.
    good, wrong = sign(VECTOR_SECRET, VECTOR_ID, NOW, b"{}"), sign(OTHER_SECRET, VECTOR_ID, NOW, b"{}")
    lines = CIMultiDict(headers(signature=wrong))
    lines.add("webhook-signature", good)
    assert verifier().verify(CIMultiDictProxy(lines), b"{}") == VECTOR_ID
    for joined in (f"{good}, {wrong}", f"{wrong}, {good}", f"{good}, v1a,x"):
        assert verifier().verify(headers(signature=joined), b"{}") == VECTOR_ID
    with pytest.raises(SignatureError, match="matches"):
        verifier().verify(headers(signature=f"{wrong}, {wrong}"), b"{}")


def test_other_versions_are_ignored_even_if_their_value_would_match() -> None:
    value = sign(VECTOR_SECRET, VECTOR_ID, NOW, b"{}").removeprefix("v1,")
    with pytest.raises(SignatureError) as exc:
        verifier().verify(headers(signature=f"v2,{value} v1a,{value} {value}"), b"{}")
    assert reason(exc) == "webhook-signature has no v1 entry"
    with pytest.raises(SignatureError, match="has no v1 entry"):  # said before the body is read
        verifier().check_headers(headers(signature=f"v2,{value}"))


def test_undecodable_v1_entries_do_not_match() -> None:
    with pytest.raises(SignatureError, match="matches"):
        verifier().verify(headers(signature="v1,***** v1,é"), b"{}")


def test_headers_are_matched_case_insensitively() -> None:
    sent = {k.title(): v for k, v in headers().items()}
    assert "Webhook-Signature" in sent
    assert verifier().verify(sent, b"{}") == VECTOR_ID


# --- missing and malformed headers ------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_is_named(missing: str) -> None:
    sent = headers()
    del sent[missing]
    with pytest.raises(SignatureError) as exc:
        verifier().verify(sent, b"{}")
    assert reason(exc) == f"missing header {missing}"


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_empty_header_counts_as_missing(missing: str) -> None:
    sent = headers()
    sent[missing] = ""
    with pytest.raises(SignatureError, match=f"^missing header {missing}$"):
        verifier().verify(sent, b"{}")


@pytest.mark.parametrize("value", ["hello", "1614265330.5", "+1614265330", " 1614265330", "1_614_265_330", "١٢٣"])
def test_timestamp_must_be_an_integer(value: str) -> None:
    sent = headers()
    sent["webhook-timestamp"] = value
    with pytest.raises(SignatureError) as exc:
        verifier().verify(sent, b"{}")
    assert reason(exc) == "webhook-timestamp is not an integer (unix seconds)"


# --- the time window --------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [-300, -299, 0, 299, 300])
def test_timestamps_within_the_tolerance_are_accepted(offset: int) -> None:
    # The clock sits `offset` seconds away from the signed timestamp; exactly the tolerance still passes.
    assert verifier(now=NOW + offset).verify(headers(), b"{}") == VECTOR_ID


def test_fractional_clock_just_past_the_tolerance_is_too_old() -> None:
    with pytest.raises(SignatureError) as exc:
        verifier(now=NOW + 300.001).verify(headers(), b"{}")
    assert reason(exc).startswith("webhook-timestamp is too old")


def test_fractional_clock_just_before_the_tolerance_is_too_new() -> None:
    with pytest.raises(SignatureError) as exc:
        verifier(now=NOW - 300.001).verify(headers(), b"{}")
    assert reason(exc).startswith("webhook-timestamp is too new")


def test_a_timestamp_in_milliseconds_is_said_to_be_one() -> None:
    with pytest.raises(SignatureError) as exc:
        verifier().verify(headers(timestamp=NOW * 1000), b"{}")
    assert reason(exc).endswith("; it is in seconds, not milliseconds")
    with pytest.raises(SignatureError) as exc:
        verifier(now=NOW - 301).verify(headers(), b"{}")
    assert "milliseconds" not in reason(exc)
    with pytest.raises(SignatureError) as exc:
        verifier(now=NOW + 301).verify(headers(), b"{}")
    assert reason(exc).endswith("a retry keeps its webhook-id and is signed again with the current time")


def test_the_window_is_checked_before_the_signature() -> None:
    # A replayed capture must be refused for its age even though its signature is genuine.
    with pytest.raises(SignatureError, match="too old"):
        verifier(now=NOW + 3600).verify(headers(), b"{}")


def test_custom_tolerance() -> None:
    strict = verifier(now=NOW + 6, tolerance=5)
    with pytest.raises(SignatureError, match=r"too old \(more than 5 s ago\)"):
        strict.verify(headers(), b"{}")
    assert verifier(now=NOW + 5, tolerance=5).verify(headers(), b"{}") == VECTOR_ID


@pytest.mark.parametrize(("value", "word"), [("9" * 40, "new"), ("-" + "9" * 40, "old"), ("-5", "old")])
def test_absurd_timestamps_are_out_of_window_not_errors(value: str, word: str) -> None:
    sent = headers()
    sent["webhook-timestamp"] = value
    with pytest.raises(SignatureError, match=f"too {word}"):
        verifier().verify(sent, b"{}")


def test_reasons_never_contain_the_expected_signature() -> None:
    expected = sign(VECTOR_SECRET, VECTOR_ID, NOW, b"real").removeprefix("v1,")
    with pytest.raises(SignatureError) as exc:
        verifier().verify(headers(body=b"fake"), b"real")
    assert expected not in reason(exc)
    assert "MfKQ9r8" not in reason(exc)


@pytest.mark.parametrize("secret", ["whsec_" + base64.b64encode(b"k" * 15).decode(), "fifteen-bytes!!"])
def test_a_secret_shorter_than_16_bytes_is_refused_by_name_never_shown(secret: str) -> None:
    # Review (security): "x", or "whsec_eA" (one byte), passed `config check`: a key guessed offline from one
    # signed request.
    with pytest.raises(ConfigError, match=r"^webhook secret is too short: 15 bytes, at least 16") as raised:
        secret_key(secret, "webhook secret")
    assert secret not in str(raised.value)
    assert len(secret_key("whsec_" + base64.b64encode(b"k" * 16).decode(), "webhook secret")) == 16
