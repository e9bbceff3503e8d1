"""User-facing errors.

Anything the user can fix (a missing file, a bad option, a malformed volume) raises
`UserError`; the CLI prints its message as one line and exits non-zero, with no traceback.
Programming errors stay ordinary exceptions so that they keep their tracebacks.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input, reported as one clear line."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the nearest valid name, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> UserError:
    """Error for an unknown registry/option name, listing the valid ones and the nearest."""
    choices = sorted(str(c) for c in choices)
    return UserError(f"unknown {kind} '{name}'{suggest(name, choices)}; choose from: {', '.join(choices)}")
