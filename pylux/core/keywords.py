"""One keyword checker for every pylux entry point: unknown names are refused with "did you mean"."""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["check_keywords"]


def check_keywords(unknown: dict, where: str, known: Iterable[str]) -> None:
    """Raise ``TypeError`` naming every keyword of ``unknown`` with the closest name in ``known``.

    Args:
        unknown: the keyword arguments that are not recognised (name -> value).
        where: the callable's name for the message, e.g. ``"solve"`` or ``"Broyden"``.
        known: the valid keyword names, listed in the message.

    A misspelt option is never silently ignored (torchdeq's issue #12): the
    message names each unknown keyword, the closest valid one when there is a
    close match, and every valid keyword.
    """
    if not unknown:
        return
    known = tuple(known)
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), known, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(f"{where}() got unknown keyword argument(s): {', '.join(parts)}. "
                    f"Known keywords: {', '.join(known)}")
