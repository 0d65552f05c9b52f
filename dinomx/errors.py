"""The one base class of errors a user can fix, and the way every command line reports them.

A ``UserError`` is bad input, a missing file or a refused action: its message names the file,
field or gate and what was expected. Command lines print it on one line and exit 2; anything
else is a bug and keeps its traceback. It lives in the engine because every other part (data,
registry, projects, serving, portal) may import the engine, and the engine imports none of them.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem the user can fix; the message says which input and what was expected."""


class DataError(UserError, ValueError):
    """A dataset folder or file that cannot be used as it is."""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the user named (or that a config implies) is not there."""


def run_command(prog: str, call: Callable[[], object], also: tuple[type[BaseException], ...] = (),
                on_error: Callable[[BaseException], None] | None = None) -> int:
    """``call()`` as a command: 0 when it returns, 2 and one line on stderr on a ``UserError``
    (or one of ``also``: errors of a library that are the user's, such as a registry lookup).
    ``on_error`` runs first, e.g. to end the command's MLflow run FAILED with the message."""
    try:
        call()
    except (UserError, *also) as exc:
        if on_error is not None:
            on_error(exc)
        print(f"{prog}: {one_line(exc)}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
