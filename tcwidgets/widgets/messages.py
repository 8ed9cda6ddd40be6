"""Checking what a page sends: values in widget messages arrive as JSON, from a page that may be
stale, buggy or not ours."""

from typing import Any


def whole(value: Any) -> int:
    """A whole number sent by the page (JSON numbers arrive as int or float); else `ValueError`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{value!r:.100} is not a whole number")
