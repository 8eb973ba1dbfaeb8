"""How orderbus names itself to the systems it calls: ``User-Agent: orderbus/<version>``."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def _user_agent() -> str:
    """``orderbus/<version>``: the downstream's owners see who calls them, and which build."""
    try:
        return f"orderbus/{version('orderbus')}"
    except PackageNotFoundError:
        return "orderbus"


USER_AGENT = _user_agent()
