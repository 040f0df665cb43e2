"""Errors caused by what the user asked for, and how every command reports them.

A `UserError` (a bad config value, a missing or damaged file, a refused resume) is printed as one line,
`error: <message>`, and the command exits with status 1; the traceback is kept behind Hydra's usual switch,
HYDRA_FULL_ERROR=1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys


class UserError(ValueError):
    """A problem with the user's input; the message names the field, file or command to fix."""


def reported(main):
    """Wrap a command's entry point so that a UserError ends it with one line instead of a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapper
