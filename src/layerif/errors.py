"""The one exception type that means "the user's input is wrong".

The CLI turns a :class:`UserError` into a one-line message on stderr and exit
status 2, without a traceback. Library code raises it for anything the user can
fix (a missing file, an unknown option value, an empty split); everything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
from typing import Any


class UserError(ValueError):
    """Bad input from the user: message is shown as a single line, exit status 2."""


class Terminated(BaseException):
    """SIGTERM arrived (raised by the CLI's handler): the run stops as after Ctrl-C, exit status 143."""


def require_finite(value: Any, what: str) -> Any:
    """Return ``value`` (a number, a tensor or an array) when every entry is finite.

    Otherwise raise :class:`FloatingPointError` naming ``what`` (the CLI's exit
    status 1): the one check that a NaN or ±inf never reaches a result or a save.
    """
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise FloatingPointError(f"{what} is not finite ({value})")
        return value
    if hasattr(value, "isfinite"):  # a torch tensor
        bad, total = int((~value.detach().isfinite()).sum()), value.numel()
    else:
        import numpy as np

        arr = np.asarray(value, dtype=np.float64)
        bad, total = int((~np.isfinite(arr)).sum()), arr.size
    if bad:
        raise FloatingPointError(f"{what} is not finite" if total == 1
                                 else f"{what} holds non-finite values ({bad} of {total})")
    return value
