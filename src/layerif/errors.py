"""The one exception type that means "the user's input is wrong".

The CLI turns a :class:`UserError` into a one-line message on stderr and exit
status 2, without a traceback. Library code raises it for anything the user can
fix (a missing file, an unknown option value, an empty split); everything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: message is shown as a single line, exit status 2."""


class Terminated(BaseException):
    """SIGTERM arrived (raised by the CLI's handler): the run stops as after Ctrl-C, exit status 143."""
