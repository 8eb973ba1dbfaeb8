"""What in a URL, or a URL template, may be a credential, masked before it is shown (settings, errors, logs)."""

from __future__ import annotations

__all__ = ["mask_url"]

_TEMPLATE_BASE = "{base_url}"


def mask_url(value: str) -> str:
    """`value` (a setting's own text) with what may hold a credential as ``***``: in a URL, the user info (everything
    from ``scheme://`` up to the last ``@`` before the query: a password may hold quotes, spaces or a ``/``, which
    a URL pattern stops at); in a URL or a URL template (``{base_url}/...``), the query and the fragment
    (``?api_key=...``). Other text is returned as it is."""
    scheme, sep, rest = value.partition("://")
    if sep:
        head = f"{scheme}://"
        at = rest.rfind("@", 0, _query_start(rest))  # an "@" in the query (notify=ops@example.com) is no user info
        if at >= 0:
            rest = "***@" + rest[at + 1 :]
    elif value.startswith(_TEMPLATE_BASE):
        head, rest = _TEMPLATE_BASE, value.removeprefix(_TEMPLATE_BASE)
    else:
        return value
    cut = _query_start(rest)
    return head + (rest if cut == len(rest) else rest[: cut + 1] + "***")


def _query_start(text: str) -> int:
    """Where the query or the fragment of `text` (a URL without its scheme) begins; its length if it has none."""
    return min((i for i in (text.find("?"), text.find("#")) if i >= 0), default=len(text))
