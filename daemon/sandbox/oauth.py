"""The sandbox's OAuth2 token endpoint (client credentials, RFC 6749 §4.4) and the tokens it issued.

A system whose auth spec is ``oauth2:CLIENT_ID:SECRET:LIFETIME_S`` accepts only ``Authorization: Bearer <token>``
with a token issued here to that client, unexpired by the sandbox's clock and not revoked. Tokens are opaque and
random; `stats` counts what the endpoint saw.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web

from daemon.sandbox.faults import Auth


class TokenIssuer:
    """Issues, checks and revokes bearer tokens for the clients of the systems' ``oauth2:`` auth specs."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}  # issued token -> (client id, expiry by the clock)
        # token_requests (every request to the endpoint), issued, refused, scopes (issued tokens per scope)
        self.stats: dict[str, Any] = {"token_requests": 0, "issued": 0, "refused": 0, "scopes": {}}

    def accepts(self, auth: Auth, headers: Mapping[str, str]) -> bool:
        """Whether `headers` carry a live token issued to `auth`'s client."""
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        issued = self._tokens.get(token) if scheme.lower() == "bearer" else None
        return issued is not None and issued[0] == auth.client_id and self._clock() < issued[1]

    async def token(self, request: web.Request, specs: Iterable[Auth]) -> web.Response:
        """The token endpoint: a token for a client named by one of `specs` (the systems' auth specs)."""
        self.stats["token_requests"] += 1
        if request.content_type != "application/x-www-form-urlencoded":
            return self._error(400, "invalid_request")
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return self._error(400, "unsupported_grant_type")
        client_id, secret = _client_credentials(request.headers.get("Authorization", ""), form)
        auth = next((spec for spec in specs if spec.scheme == "oauth2" and spec.client_id == client_id), None)
        if auth is None or not hmac.compare_digest(secret.encode(), auth.client_secret.encode()):
            return self._error(401, "invalid_client")
        token = secrets.token_urlsafe(24)
        self._tokens[token] = (auth.client_id, self._clock() + auth.lifetime_s)
        self.stats["issued"] += 1
        lifetime = int(auth.lifetime_s) if auth.lifetime_s.is_integer() else auth.lifetime_s
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer", "expires_in": lifetime}
        scope = form.get("scope")
        if isinstance(scope, str):
            answer["scope"] = scope
            self.stats["scopes"][scope] = self.stats["scopes"].get(scope, 0) + 1
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    def revoke(self, client_id: str | None) -> int:
        """Revoke every issued token, or `client_id`'s: their next use is a 401. How many were revoked."""
        revoked = [token for token, (owner, _) in self._tokens.items() if client_id in (None, owner)]
        for token in revoked:
            del self._tokens[token]
        return len(revoked)

    def _error(self, status: int, error: str) -> web.Response:
        self.stats["refused"] += 1
        headers = {"WWW-Authenticate": "Basic"} if status == 401 else {}
        return web.json_response({"error": error}, status=status, headers=headers)


def _client_credentials(authorization: str, form: Mapping[str, Any]) -> tuple[str, str]:
    """The client's id and secret: from HTTP Basic (each form-encoded, RFC 6749 §2.3.1), else from the form."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except ValueError:
            return "", ""
        client_id, _, secret = decoded.partition(":")
        return unquote_plus(client_id), unquote_plus(secret)
    given_id, given_secret = form.get("client_id"), form.get("client_secret")
    return (given_id if isinstance(given_id, str) else ""), (given_secret if isinstance(given_secret, str) else "")


__all__ = ["TokenIssuer"]
