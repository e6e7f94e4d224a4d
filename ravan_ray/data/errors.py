"""The one error class of the data package: a problem the user can fix, said in one line."""

from __future__ import annotations


class DataError(ValueError):
    """A data problem the user can fix; the message is one line naming it."""


def one_line(e: BaseException) -> str:
    """A library's error as the tail of one of our one-line messages."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
