"""The one error class of the data package: a problem the user can fix, said in one line."""

from __future__ import annotations


class DataError(ValueError):
    """A data problem the user can fix; the message is one line naming it."""


def one_line(e: BaseException) -> str:
    """A library's error as the tail of one of our one-line messages. A library that wraps the error it
    caught ("An error occurred while generating the dataset") keeps the useful part (a row, a byte offset)
    in the error it was raised from: the innermost explicit cause, or, under a wrapper with no message of
    its own, the error it was handling."""
    while e.__cause__ is not None or (not str(e).strip() and e.__context__ is not None):
        e = e.__cause__ or e.__context__
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
