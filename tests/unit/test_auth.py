"""Credentials per sink: the static schemes, OAuth2 against the sandbox's token endpoint, the 401 renewal, settings.

The sandbox runs in-process (aiohttp's test server) on the same `FakeClock` as the client, so token lifetimes pass
when the test advances the clock; nothing sleeps. Odd token endpoints are small aiohttp apps of their own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from support import free_port

from consumers.auth import (
    ApiKeyHeader,
    Auth,
    BasicAuth,
    BearerToken,
    CredentialsRefused,
    NoAuth,
    OAuth2Client,
    OAuth2ClientCredentials,
    TokenUnavailable,
    authorized_attempt,
)
from consumers.clock import FakeClock, SystemClock
from consumers.crm import CrmSink
from consumers.deadlines import Deadlines
from consumers.delivery import Reply, TransportFailure
from consumers.http_client import HttpClient
from consumers.identity import USER_AGENT
from consumers.policy import DEFAULT_POLICY
from daemon.sandbox import Sandbox, SandboxClient, build_sandbox_app
from daemon.sandbox.faults import Auth as SandboxAuth
from daemon.sandbox.faults import SystemConfig
from daemon.settings import load_settings
from daemon.sinks import build_auth
from topics.errors import ConfigError
from topics.samples import sample_event

CLIENT_ID = "orderbus-crm"
CLIENT_SECRET = "cs-Zq8/top:secret+&"  # characters that Basic client auth must form-encode (RFC 6749 §2.3.1)
LIFETIME = 60


def sandbox_auth(spec: str) -> SystemConfig:
    return SystemConfig(auth=SandboxAuth.parse(spec, "test"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sandbox(clock: FakeClock) -> Sandbox:
    return Sandbox(
        clock=clock.now,
        config={
            "crm": sandbox_auth(f"oauth2:{CLIENT_ID}:{CLIENT_SECRET}:{LIFETIME}"),
            "shipping": sandbox_auth("oauth2:someone-else:other-secret:60"),
        },
    )


@pytest.fixture
async def server(sandbox: Sandbox) -> AsyncIterator[TestServer]:
    test_server = TestServer(build_sandbox_app(sandbox))
    await test_server.start_server()
    yield test_server
    await test_server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    """The deliveries' HTTP client, as the runner makes it."""
    async with HttpClient(limit=32) as client:
        yield client


@pytest.fixture
async def oauth(server: TestServer, clock: FakeClock) -> AsyncIterator[Callable[..., OAuth2ClientCredentials]]:
    """Makes OAuth2 clients of the sandbox's token endpoint (each with its own pool, as in production)."""
    made: list[OAuth2ClientCredentials] = []
    base = OAuth2Client(str(server.make_url("/_sandbox/oauth/token")), CLIENT_ID, CLIENT_SECRET, refresh_margin=10)

    def make(**changes: Any) -> OAuth2ClientCredentials:
        auth = OAuth2ClientCredentials(replace(base, **changes), name="crm", clock=clock, timeout=5)
        made.append(auth)
        return auth

    yield make
    for auth in made:
        await auth.aclose()


async def deliver(
    http: HttpClient, base_url: str, auth: Auth, *, system: str = "crm", number: str = "SO-1"
) -> Reply | TransportFailure:
    """One attempt of a CRM create, as the runner's deliver makes it."""
    sink = CrmSink(system, f"{base_url}/{system}")
    request = sink.request(sink.prepare(sample_event(random.Random(number), order_number=number)), None)
    return await authorized_attempt(
        http, request, auth, idempotency_key=f"key-{system}-{number}", timeout=5, deadlines=Deadlines(SystemClock())
    )


def status(outcome: Reply | TransportFailure) -> int:
    assert isinstance(outcome, Reply), outcome
    return outcome.status


def statuses(sandbox: Sandbox, system: str) -> list[int | None]:
    return [record["status"] for record in sandbox.systems[system].requests]


def url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


# ---- OAuth2 against the sandbox's token endpoint -----------------------------------------------------------------


async def test_one_token_request_serves_many_deliveries(
    http: HttpClient,
    server: TestServer,
    sandbox: Sandbox,
    oauth: Callable[..., OAuth2ClientCredentials],
) -> None:
    auth = oauth()
    together = await asyncio.gather(*(deliver(http, url(server), auth, number=f"SO-{i}") for i in range(20)))
    after = [await deliver(http, url(server), auth, number=f"SO-{i}") for i in range(20, 30)]
    assert [status(outcome) for outcome in [*together, *after]] == [201] * 30
    assert sandbox.oauth["token_requests"] == sandbox.oauth["issued"] == 1


async def test_the_token_is_renewed_shortly_before_it_expires(
    http: HttpClient,
    server: TestServer,
    sandbox: Sandbox,
    clock: FakeClock,
    oauth: Callable[..., OAuth2ClientCredentials],
) -> None:
    auth = oauth()  # lifetime 60 s, margin 10 s: renewed from 50 s on
    first = await auth.headers()
    assert status(await deliver(http, url(server), auth, number="SO-1")) == 201
    await clock.advance(49.9)
    assert await auth.headers() == first
    await clock.advance(0.1)
    second = await auth.headers()
    assert second != first
    assert status(await deliver(http, url(server), auth, number="SO-2")) == 201
    await clock.advance(50)  # the second token's own renewal is due
    assert await auth.headers() not in (first, second)
    assert sandbox.oauth["token_requests"] == 3
    assert 401 not in statuses(sandbox, "crm"), "renewed before expiry, never after a refusal"


async def test_a_short_lived_token_is_renewed_at_half_its_life_whatever_the_margin(
    server: TestServer, sandbox: Sandbox, clock: FakeClock, oauth: Callable[..., OAuth2ClientCredentials]
) -> None:
    sandbox.config["accounting"] = sandbox_auth("oauth2:short-lived:s3:4")
    auth = oauth(client_id="short-lived", client_secret="s3", refresh_margin=30)
    first = await auth.headers()
    await clock.advance(1.9)
    assert await auth.headers() == first
    await clock.advance(0.1)
    assert await auth.headers() != first
    assert sandbox.oauth["token_requests"] == 2


async def test_a_401_renews_the_token_once_for_every_delivery_that_saw_it(
    http: HttpClient,
    server: TestServer,
    sandbox: Sandbox,
    session: aiohttp.ClientSession,
    oauth: Callable[..., OAuth2ClientCredentials],
) -> None:
    auth = oauth()
    assert status(await deliver(http, url(server), auth, number="SO-0")) == 201
    async with SandboxClient(url(server), session=session) as control:
        assert await control.revoke_tokens(CLIENT_ID) == 1
    outcomes = await asyncio.gather(*(deliver(http, url(server), auth, number=f"SO-{i}") for i in range(1, 11)))
    assert [status(outcome) for outcome in outcomes] == [201] * 10
    assert sandbox.oauth["token_requests"] == 2, "one renewal, however many requests saw the revoked token"
    crm = statuses(sandbox, "crm")
    assert (crm.count(401), crm.count(201)) == (10, 11)
    assert [entry["order_number"] for entry in sandbox.ledger("crm")].count("SO-5") == 1


async def test_a_second_401_is_the_answer_and_the_policy_pauses_the_sink(
    http: HttpClient,
    server: TestServer,
    sandbox: Sandbox,
    oauth: Callable[..., OAuth2ClientCredentials],
) -> None:
    auth = oauth()  # shipping accepts only tokens of another client
    outcome = await deliver(http, url(server), auth, system="shipping")
    assert status(outcome) == 401
    assert statuses(sandbox, "shipping") == [401, 401]
    assert sandbox.oauth["token_requests"] == 2, "the first token and exactly one renewal"
    assert DEFAULT_POLICY.decide(401).action == "pause_auth"


async def test_refused_client_credentials_pause_the_sink_and_reach_no_downstream(
    http: HttpClient,
    server: TestServer,
    sandbox: Sandbox,
    oauth: Callable[..., OAuth2ClientCredentials],
) -> None:
    auth = oauth(client_secret="wrong-secret")
    outcome = await deliver(http, url(server), auth)
    assert isinstance(outcome, Reply)
    assert outcome.status == 401
    assert DEFAULT_POLICY.decide(outcome.status).action == "pause_auth"
    host = f"127.0.0.1:{server.port}"
    assert json.loads(outcome.body) == {
        "error": "credentials_refused",
        "detail": f"token endpoint {host}: answered 401 (invalid_client)",
    }
    assert "crm" not in sandbox.systems
    assert sandbox.oauth == {"token_requests": 1, "issued": 0, "refused": 1, "scopes": {}}


async def test_client_secret_post_and_scope(
    http: HttpClient,
    server: TestServer,
    sandbox: Sandbox,
    oauth: Callable[..., OAuth2ClientCredentials],
) -> None:
    auth = oauth(client_auth="client_secret_post", scope="orders:write contacts")
    assert status(await deliver(http, url(server), auth)) == 201
    assert sandbox.oauth["scopes"] == {"orders:write contacts": 1}


async def test_the_sandbox_token_endpoint_refuses_what_it_should(
    server: TestServer, sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    token_url = str(server.make_url("/_sandbox/oauth/token"))
    good = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    for data, expected in [
        ({**good, "grant_type": "password"}, (400, "unsupported_grant_type")),
        ({**good, "client_id": "nobody"}, (401, "invalid_client")),
        ({**good, "client_secret": "nope"}, (401, "invalid_client")),
    ]:
        async with session.post(token_url, data=data) as response:
            assert (response.status, (await response.json())["error"]) == expected
    async with session.post(token_url, json=good) as response:
        assert (response.status, (await response.json())["error"]) == (400, "invalid_request")
    async with session.post(token_url, data=good) as response:
        answer = await response.json()
        assert (answer["token_type"], answer["expires_in"]) == ("Bearer", LIFETIME)
        assert response.headers["Cache-Control"] == "no-store"
    assert sandbox.oauth["token_requests"] == 5
    assert sandbox.oauth["refused"] == 4


async def test_the_sandbox_accepts_only_unexpired_unrevoked_tokens_of_the_systems_client(
    server: TestServer, sandbox: Sandbox, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    token_url = str(server.make_url("/_sandbox/oauth/token"))
    grant = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}

    async def fresh_token() -> str:
        async with session.post(token_url, data=grant) as response:
            value: str = (await response.json())["access_token"]
            return value

    async def create(system: str, value: str, number: str) -> int:
        headers = {"Authorization": f"Bearer {value}"}
        async with session.post(
            server.make_url(f"/{system}/orders"), json={"order_number": number}, headers=headers
        ) as r:
            return r.status

    first = await fresh_token()
    assert await create("crm", first, "SO-1") == 201
    assert await create("shipping", first, "SO-1") == 401, "shipping's client is another one"
    assert await create("crm", "made-up", "SO-2") == 401
    await clock.advance(LIFETIME)
    assert await create("crm", first, "SO-2") == 401, "expired"
    second = await fresh_token()
    async with SandboxClient(url(server), session=session) as control:
        assert await control.revoke_tokens("someone-else") == 0
        assert await control.revoke_tokens() == 2
    assert await create("crm", second, "SO-2") == 401, "revoked"
    config = json.dumps(await (await session.get(server.make_url("/_sandbox/config"))).json())
    assert CLIENT_SECRET not in config
    assert '"oauth2:***"' in config


def test_oauth2_sandbox_specs() -> None:
    parsed = SandboxAuth.parse("oauth2:client:se:cr:et:2.5", "x")
    assert (parsed.client_id, parsed.client_secret, parsed.lifetime_s) == ("client", "se:cr:et", 2.5)
    assert "se:cr:et" not in repr(parsed)
    assert not parsed.accepts({"Authorization": ""}), "the sandbox checks issued tokens itself"
    for bad in ("oauth2:client:secret", "oauth2:client:secret:0", "oauth2::secret:60", "oauth2:client::60"):
        with pytest.raises(ConfigError, match="oauth2:CLIENT_ID:SECRET:LIFETIME_S"):
            SandboxAuth.parse(bad, "auth.crm")


# ---- odd token endpoints -----------------------------------------------------------------------------------------


class TokenEndpoint:
    """A token endpoint that gives the scripted answers in turn (the last one again when they run out)."""

    def __init__(self, *answers: tuple[int, Any]) -> None:
        self.answers = list(answers)
        self.requests = 0
        self.user_agents: list[str | None] = []
        self.accepts: list[str | None] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.user_agents.append(request.headers.get("User-Agent"))
        self.accepts.append(request.headers.get("Accept"))
        status, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if status == 302:
            return web.Response(status=302, headers={"Location": "https://elsewhere.example.test/token"})
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(status=status, text=text, content_type="application/json")


@pytest.fixture
async def endpoint() -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []

    async def start(*answers: tuple[int, Any]) -> tuple[TokenEndpoint, str]:
        fake = TokenEndpoint(*answers)
        app = web.Application()
        app.router.add_post("/token", fake.handle)
        test_server = TestServer(app)
        await test_server.start_server()
        servers.append(test_server)
        return fake, str(test_server.make_url("/token"))

    yield start
    for test_server in servers:
        await test_server.close()


def token(value: str, expires_in: object = 60, **extra: object) -> tuple[int, dict[str, object]]:
    answer: dict[str, object] = {"access_token": value, "token_type": "bearer", **extra}
    if expires_in is not None:
        answer["expires_in"] = expires_in
    return 200, answer


def client_of(token_url: str) -> OAuth2Client:
    return OAuth2Client(token_url, CLIENT_ID, CLIENT_SECRET, refresh_margin=10)


@pytest.mark.parametrize(
    ("answer", "kind", "detail"),
    [
        ((503, {"error": "temporarily_unavailable"}), "unavailable", "answered 503 (temporarily_unavailable)"),
        ((429, ""), "unavailable", "answered 429"),
        (
            (400, {"error": "invalid_scope", "error_description": "leaky text"}),
            "refused",
            "answered 400 (invalid_scope)",
        ),
        ((400, {"error": "not a code: with spaces"}), "refused", "answered 400"),
        ((302, ""), "refused", "answered 302"),
        ((200, "<html>login</html>"), "refused", "without a JSON object"),
        ((200, "[" * 100_000 + "]" * 100_000), "refused", "without a JSON object"),  # RecursionError
        ((400, '{"error": ' + "[" * 100_000 + "]" * 100_000 + "}"), "refused", "answered 400"),
        ((200, {"token_type": "Bearer"}), "refused", "without a usable access_token"),
        (token("bad token\r\nX-Injected: 1"), "refused", "without a usable access_token"),
        ((200, {"access_token": "abc", "token_type": "mac"}), "refused", "not a bearer token"),
    ],
)
async def test_token_endpoint_answers_become_the_right_outcome(
    http: HttpClient,
    endpoint: Callable[..., Any],
    session: aiohttp.ClientSession,
    clock: FakeClock,
    answer: tuple[int, Any],
    kind: str,
    detail: str,
) -> None:
    fake, token_url = await endpoint(answer)
    auth = OAuth2ClientCredentials(client_of(token_url), clock=clock, session=session)
    error = CredentialsRefused if kind == "refused" else TokenUnavailable
    with pytest.raises(error, match=r"^token endpoint 127\.0\.0\.1:[0-9]+: .*" + re.escape(detail)):
        await auth.headers()
    outcome = await deliver(http, "http://127.0.0.1:9", auth)  # never reached: no credentials, no request
    if kind == "refused":
        assert isinstance(outcome, Reply)
        assert outcome.status == 401
        assert b"leaky" not in outcome.body
    else:
        assert isinstance(outcome, TransportFailure)
        assert (outcome.kind, detail in outcome.detail) == ("connection", True)
    assert fake.requests == 2


async def test_token_requests_name_orderbus_as_the_deliveries_do(
    endpoint: Callable[..., Any], clock: FakeClock
) -> None:
    # Review (downstream owner): they said "Python/3.11 aiohttp/3.x", so the identity provider's log did not show
    # who asked.
    fake, token_url = await endpoint(token("t-1"))
    auth = OAuth2ClientCredentials(client_of(token_url), clock=clock)  # its own session, as in production
    try:
        await auth.headers()
    finally:
        await auth.aclose()
    assert fake.user_agents == [USER_AGENT]
    assert USER_AGENT.startswith("orderbus")
    assert fake.accepts == ["application/json"]  # some providers answer a form-encoded token without it


async def test_an_unreachable_token_endpoint_is_temporary(
    http: HttpClient, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    auth = OAuth2ClientCredentials(client_of(f"http://127.0.0.1:{free_port()}/token"), clock=clock, session=session)
    outcome = await deliver(http, "http://127.0.0.1:9", auth)
    assert isinstance(outcome, TransportFailure)
    assert outcome.kind == "connection"
    assert outcome.detail.startswith("token endpoint 127.0.0.1:")


async def test_a_failed_early_renewal_keeps_the_valid_token_until_it_expires(
    endpoint: Callable[..., Any], session: aiohttp.ClientSession, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake, token_url = await endpoint(token("first"), (503, ""), (503, ""), token("second"))
    auth = OAuth2ClientCredentials(client_of(token_url), clock=clock, session=session)
    assert await auth.headers() == {"Authorization": "Bearer first"}
    await clock.advance(55)  # due at 50, expires at 60
    assert await auth.headers() == {"Authorization": "Bearer first"}
    assert "renewal failed; using the current token" in caplog.text
    assert await auth.headers() == {"Authorization": "Bearer first"}
    assert fake.requests == 2, "the next try waits half the remaining life"
    await clock.advance(2.5)
    assert await auth.headers() == {"Authorization": "Bearer first"}
    assert fake.requests == 3
    await clock.advance(10)  # expired: only a new token will do
    assert await auth.headers() == {"Authorization": "Bearer second"}
    assert fake.requests == 4


async def test_a_refused_early_renewal_keeps_the_valid_token_too_and_says_so_as_an_error(
    endpoint: Callable[..., Any], session: aiohttp.ClientSession, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Review (downstream owner): a refusal at the early renewal paused the sink while its token was still good.
    refusal = (401, '{"error": "invalid_client"}')
    _, token_url = await endpoint(token("first"), refusal, refusal)
    auth = OAuth2ClientCredentials(client_of(token_url), clock=clock, session=session)
    assert await auth.headers() == {"Authorization": "Bearer first"}
    await clock.advance(55)  # due at 50, expires at 60
    assert await auth.headers() == {"Authorization": "Bearer first"}
    assert [r.levelname for r in caplog.records if "renewal refused" in r.getMessage()] == ["ERROR"]
    await clock.advance(10)  # expired: the refusal stands
    with pytest.raises(CredentialsRefused):
        await auth.headers()


async def test_an_expired_token_is_never_sent(
    endpoint: Callable[..., Any], session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    _, token_url = await endpoint(token("first", expires_in="60"), (503, ""))
    auth = OAuth2ClientCredentials(client_of(token_url), clock=clock, session=session)
    assert await auth.headers() == {"Authorization": "Bearer first"}
    await clock.advance(60)
    with pytest.raises(TokenUnavailable, match="answered 503"):
        await auth.headers()


async def test_a_token_without_lifetime_is_kept_until_a_401(
    endpoint: Callable[..., Any], session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake, token_url = await endpoint(token("first", expires_in=None), token("second", expires_in=None))
    auth = OAuth2ClientCredentials(client_of(token_url), clock=clock, session=session)
    rejected = await auth.headers()
    await clock.advance(10**6)
    assert await auth.headers() == rejected
    assert await auth.refresh(rejected) is True
    assert await auth.headers() == {"Authorization": "Bearer second"}
    assert await auth.refresh(rejected) is True, "already renewed since: send again"
    assert fake.requests == 2


async def test_a_renewal_that_brings_the_same_token_does_not_resend(
    endpoint: Callable[..., Any], session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake, token_url = await endpoint(token("same"))
    auth = OAuth2ClientCredentials(client_of(token_url), clock=clock, session=session)
    assert await auth.refresh(await auth.headers()) is False
    assert fake.requests == 2


async def test_close_releases_the_token_endpoint_pool(endpoint: Callable[..., Any], clock: FakeClock) -> None:
    _, token_url = await endpoint(token("t"))
    auth = OAuth2ClientCredentials(client_of(token_url), clock=clock)
    await auth.headers()
    session = auth._session
    await auth.aclose()
    assert session is not None
    assert session.closed


# ---- the static schemes ------------------------------------------------------------------------------------------


async def test_static_headers() -> None:
    assert await NoAuth().headers() == {}
    assert await BearerToken("tok-123").headers() == {"Authorization": "Bearer tok-123"}
    # RFC 7617's own example.
    assert await BasicAuth("Aladdin", "open sesame").headers() == {
        "Authorization": "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
    }
    assert await ApiKeyHeader("X-Api-Key", "key-789").headers() == {"X-Api-Key": "key-789"}


@pytest.mark.parametrize(
    ("spec", "right", "wrong"),
    [
        ("bearer:tok-123", BearerToken("tok-123"), BearerToken("tok-000")),
        ("basic:orderbus:pw-456", BasicAuth("orderbus", "pw-456"), BasicAuth("orderbus", "pw-000")),
        ("header:X-Api-Key:key-789", ApiKeyHeader("X-Api-Key", "key-789"), ApiKeyHeader("X-Api-Key", "key-000")),
    ],
)
async def test_static_schemes_against_the_sandbox_and_no_resend_after_a_401(
    http: HttpClient,
    server: TestServer,
    sandbox: Sandbox,
    spec: str,
    right: Auth,
    wrong: Auth,
) -> None:
    sandbox.config["accounting"] = sandbox_auth(spec)
    assert status(await deliver(http, url(server), wrong, system="accounting")) == 401
    assert status(await deliver(http, url(server), right, system="accounting")) == 201
    assert statuses(sandbox, "accounting") == [401, 201], "fixed credentials are not sent again after a 401"
    assert await wrong.refresh(await wrong.headers()) is False


# ---- secrets stay secret -----------------------------------------------------------------------------------------


async def test_secrets_appear_in_no_log_line_and_no_repr(
    http: HttpClient,
    server: TestServer,
    sandbox: Sandbox,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    oauth: Callable[..., OAuth2ClientCredentials],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    auth = oauth()
    await deliver(http, url(server), auth, number="SO-1")
    tokens = [(await auth.headers())["Authorization"].split()[1]]
    async with SandboxClient(url(server), session=session) as control:
        await control.revoke_tokens()
    await deliver(http, url(server), auth, number="SO-2")  # a 401, a renewal
    tokens.append((await auth.headers())["Authorization"].split()[1])
    await deliver(http, url(server), oauth(client_secret="wrong-Zq8-secret"), number="SO-3")
    await clock.advance(3600)
    await deliver(http, url(server), auth, number="SO-4")
    assert caplog.records, "the flows above do log"
    logged = caplog.text + "".join(repr(vars(record)) for record in caplog.records)
    statics = [BearerToken("tok-123"), BasicAuth("orderbus", "pw-456"), ApiKeyHeader("X-Api-Key", "key-789")]
    shown = "".join(repr(item) + str(item) for item in [auth, auth.client, *statics])
    for secret in [CLIENT_SECRET, "wrong-Zq8-secret", *tokens, "tok-123", "pw-456", "key-789"]:
        assert secret not in logged
        assert secret not in shown
    assert "client_id='orderbus-crm'" in shown


# ---- settings ----------------------------------------------------------------------------------------------------


def test_auth_settings_from_toml_and_credential_files(tmp_path: Path) -> None:
    config = tmp_path / "orderbus.toml"
    config.write_text(
        "[sinks.crm.auth]\n"
        'type = "oauth2"\n'
        'token_url = "https://login.example.test/oauth2/token"\n'
        'client_id = "orderbus"\n'
        'scope = "orders.write"\n'
        "[sinks.shipping.auth]\n"
        'type = "api_key"\n'
        'header = "X-Carrier-Key"\n'
        "key = 123456\n"
    )
    (tmp_path / "crm-secret").write_text("oauth-Zq8-secret\n")
    (tmp_path / "acc-password").write_text("basic-Zq8-password\n")
    env = {
        "ORDERBUS_SINKS__CRM__AUTH__CLIENT_SECRET_FILE": str(tmp_path / "crm-secret"),
        "ORDERBUS_SINKS__ACCOUNTING__AUTH__TYPE": "basic",
        "ORDERBUS_SINKS__ACCOUNTING__AUTH__USERNAME": "orderbus",
        "ORDERBUS_SINKS__ACCOUNTING__AUTH__PASSWORD_FILE": str(tmp_path / "acc-password"),
    }
    settings = load_settings(config, env=env)
    built = {name: build_auth(name, settings.sinks[name]) for name in ("crm", "accounting", "shipping")}
    assert isinstance(built["crm"], OAuth2ClientCredentials)
    assert built["crm"].client == OAuth2Client(
        "https://login.example.test/oauth2/token", "orderbus", "oauth-Zq8-secret", scope="orders.write"
    )
    assert built["accounting"] == BasicAuth("orderbus", "basic-Zq8-password")
    assert built["shipping"] == ApiKeyHeader("X-Carrier-Key", "123456"), "a numeric key in TOML is still a key"
    assert isinstance(build_auth("crm", load_settings(None, env={}).sinks["crm"]), NoAuth)
    printed = settings.masked_json() + repr(settings) + str(settings) + "".join(map(repr, built.values()))
    for secret in ("oauth-Zq8-secret", "basic-Zq8-password", "123456"):
        assert secret not in printed


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"TOKEN": "t"}, ["sinks.crm.auth.type: missing: name the scheme"]),
        ({"TYPE": "kerberos"}, ["sinks.crm.auth", "kerberos", "oauth2"]),
        ({"TYPE": "bearer", "TOKEN": "tok-Zq8\nX-Injected: 1"}, ["sinks.crm.auth", "control characters"]),
        ({"TYPE": "bearer", "TOKEN": ""}, ["sinks.crm.auth", "token must not be empty"]),
        ({"TYPE": "api_key", "HEADER": "Idempotency-Key", "KEY": "k"}, ["auth.header", "sets itself"]),
        ({"TYPE": "api_key", "HEADER": "X Key", "KEY": "k"}, ["auth.header"]),
        ({"TYPE": "basic", "USERNAME": "a:b", "PASSWORD": "p"}, ["auth.username"]),
        ({"TYPE": "oauth2", "TOKEN_URL": "login", "CLIENT_ID": "c"}, ["auth.token_url", "auth.client_secret"]),
    ],
)
def test_bad_auth_settings_name_the_key_and_never_quote_a_secret(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(None, env={f"ORDERBUS_SINKS__CRM__AUTH__{key}": value for key, value in env.items()})
    for name in names:
        assert name in str(raised.value)
    assert "Zq8" not in str(raised.value)
