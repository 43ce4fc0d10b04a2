"""User-facing errors.

A `UserError` is a mistake in the recipe or the inputs: the CLI prints its one-line message and
exits with code 2. Anything else that escapes is a bug in ri-merge (exit code 1).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Bad input: printed as one line, exit code 2, no traceback.

    Control characters in the message (a tensor name or path holding a newline, from a hostile
    file) are escaped, so the message stays one line whatever it quotes."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(str(message)))


class ResumableError(UserError):
    """A merge that stopped part-way for a reason outside the inputs (e.g. Ray workers lost more
    often than the retries allow): its staging folder and finished units are kept for --resume."""


class MergeInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a merge after some of its work units were finished: the staging
    folder keeps them for `--resume`. A KeyboardInterrupt still, so callers that stop on one
    stop on this; `kept` of `total` units are journaled."""

    def __init__(self, out: Path, kept: int, total: int) -> None:
        super().__init__(f"interrupted: {kept} of {total} work units of {out} kept for --resume")
        self.out, self.kept, self.total = out, kept, total
        self.command: str | None = None  # the CLI's command line to continue, when it knows it


def one_line(text: str) -> str:
    """`text` with control characters written as escapes (\\n, \\x1b, ...)."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode() for ch in text
    )


def closest(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' hint, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def shown(value: Any, limit: int = 60) -> str:
    """`value` quoted on one short line, for error messages about hostile input."""
    if isinstance(value, int) and value.bit_length() > 10_000:  # repr refuses over 4300 digits
        return f"a {value.bit_length()}-bit integer"
    text = repr(value) if not isinstance(value, str) else repr(value)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hint(word: Any, choices: Any) -> str:
    """`closest` for a word that may be huge or not a string."""
    return closest(word, choices) if isinstance(word, str) and len(word) <= 100 else ""
