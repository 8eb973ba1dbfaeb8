"""The sandbox's control API from Python, for tests, the demo and benchmarks (see `daemon.sandbox`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, cast

import aiohttp

from daemon.sandbox.records import CONTROL, LedgerEntry, RequestRecord, SandboxError


class SandboxClient:
    """The control API from Python. Pass a session to share one (e.g. a `TestClient`'s), else it owns one."""

    def __init__(self, base_url: str, *, session: aiohttp.ClientSession | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> SandboxClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def ledger(self, system: str | None = None, *, since: int = 0) -> list[LedgerEntry]:
        """Applied effects in order; `since` is the last ``seq`` already seen."""
        return cast(list[LedgerEntry], await self._call("GET", "/ledger", _query(system=system, since=since)))

    async def wait_ledger(
        self, system: str | None, count: int, *, since: int = 0, timeout: float = 10.0
    ) -> list[LedgerEntry]:
        """The ledger once it holds `count` entries (after `since`); the server waits, nobody polls.

        Raises `SandboxError` listing what arrived when `timeout` passes first.
        """
        query = _query(system=system, since=since, min_count=count, wait=timeout)
        entries = cast(list[LedgerEntry], await self._call("GET", "/ledger", query, timeout=timeout + 5))
        if len(entries) < count:
            raise SandboxError(f"ledger of {system or 'all systems'}: {len(entries)} of {count} effects: {entries}")
        return entries

    async def requests(self, system: str | None = None, *, since: int = 0) -> list[RequestRecord]:
        return cast(list[RequestRecord], await self._call("GET", "/requests", _query(system=system, since=since)))

    async def stats(self) -> dict[str, Any]:
        """``{"systems": {name: counts}, "total": counts, "oauth": counts}``; see `SystemState.stats` for the counts.

        ``oauth``: ``token_requests`` (every request to the token endpoint), ``issued``, ``refused`` and
        ``scopes`` (issued tokens per requested scope).
        """
        return cast(dict[str, Any], await self._call("GET", "/stats"))

    async def orders(self, system: str) -> list[dict[str, Any]]:
        """Every order of `system` as ``{"id", "order_number", "status", "version", "body"}``, fault-free."""
        return cast(list[dict[str, Any]], await self._call("GET", "/orders", {"system": system}))

    async def script(self, system: str, steps: Sequence[Mapping[str, Any]]) -> None:
        """Replace `system`'s script (see `daemon.sandbox.faults.Step` for a step's keys)."""
        await self._call("POST", "/script", json_body={system: list(steps)})

    async def remaining_script(self, system: str) -> list[dict[str, Any]]:
        scripts = cast(dict[str, list[dict[str, Any]]], await self._call("GET", "/script"))
        return scripts.get(system, [])

    async def faults(self, system: str, **faults: Any) -> None:
        """Replace `system`'s faults (``"*"``: every system without its own); no keywords: a quiet system."""
        await self._call("POST", "/faults", json_body={system: faults})

    async def configure(self, system: str, **config: Any) -> None:
        """Change `system`'s ``auth`` (spec or None), ``idempotency`` or ``unique_order_numbers``."""
        await self._call("POST", "/config", json_body={system: config})

    async def configure_auth(self, system: str, spec: str | None) -> None:
        """``bearer:TOKEN``, ``basic:USER:PASSWORD``, ``header:NAME:VALUE``, ``oauth2:CLIENT_ID:SECRET:LIFETIME_S``
        or None (no auth).
        """
        await self.configure(system, auth=spec)

    async def revoke_tokens(self, client_id: str | None = None) -> int:
        """Revoke the tokens issued so far (all, or `client_id`'s); how many were revoked."""
        answer = await self._call(
            "POST", "/oauth/revoke", json_body={} if client_id is None else {"client_id": client_id}
        )
        return cast(int, answer["revoked"])

    @property
    def token_url(self) -> str:
        """The OAuth2 token endpoint, for a sink's ``auth.token_url``."""
        return f"{self.base_url}{CONTROL}/oauth/token"

    async def lose(self, system: str, order_numbers: Sequence[str]) -> int:
        """Make `system` forget these orders (a restore from an older backup); how many it held."""
        answer = await self._call("POST", "/lose", json_body={system: list(order_numbers)})
        return cast(int, answer[system])

    async def reset(self, seed: int | None = None) -> None:
        await self._call("POST", "/reset", json_body={} if seed is None else {"seed": seed})

    async def _call(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        *,
        json_body: Any = None,
        timeout: float = 10.0,
    ) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = f"{self.base_url}{CONTROL}{path}"
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        async with self._session.request(method, url, params=query, json=json_body, timeout=client_timeout) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise SandboxError(f"{method} {CONTROL}{path}: {resp.status} {text}")
            return json.loads(text)


def _query(**params: object) -> dict[str, str]:
    return {key: str(value) for key, value in params.items() if value is not None}


__all__ = ["SandboxClient"]
