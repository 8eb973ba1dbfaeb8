"""Error answers of the HTTP API as RFC 9457 problem documents, one function per kind of problem."""

from __future__ import annotations

import json
from collections.abc import Sequence

from aiohttp import web

from topics.errors import FieldError

PROBLEM_TYPE = "application/problem+json"
# Field errors listed in one answer at most: a body of 1 MiB can hold 100,000 unknown keys, whose list would be a
# 9 MB answer that nobody reads past its first screen.
MAX_LISTED_ERRORS = 100


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    errors: Sequence[FieldError] = (),
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A problem answer. `code` is a stable machine-readable name (also the ``type`` URI's last segment). Of
    `errors`, the first `MAX_LISTED_ERRORS` are listed, and `detail` says how many there were."""
    if len(errors) > MAX_LISTED_ERRORS:
        detail = f"{detail} ({len(errors)} problems; the first {MAX_LISTED_ERRORS} are listed)"
        errors = errors[:MAX_LISTED_ERRORS]
    return web.Response(
        status=status,
        body=problem_body(status, code, detail, errors),
        content_type=PROBLEM_TYPE,
        headers=headers,
    )


def problem_body(status: int, code: str, detail: str, errors: Sequence[FieldError] = ()) -> bytes:
    """The problem document's JSON (`problem` lists at most `MAX_LISTED_ERRORS` of `errors` first)."""
    body: dict[str, object] = {
        "type": f"https://orderbus.dev/problems/{code}",
        "title": code.replace("-", " "),
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = [error.as_dict() for error in errors]
    return json.dumps(body).encode()
