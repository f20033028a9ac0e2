"""Expected failures: what the ``secptune`` command prints in one line.

A :class:`UserError` is caused by the user's input or environment (a bad option, file, policy,
cluster, a party that died) and its message says what to change; the CLI prints it as
``secptune: error: <message>`` and exits with 2. Anything else is a bug and keeps its
traceback. ``UserError`` is a ``ValueError`` so that callers catching bad values keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """An expected failure; the message (first line) names the problem and what to do."""


class Refused(UserError):
    """A party's rule refused a program or a reveal: nothing ran and nothing left the parties."""
