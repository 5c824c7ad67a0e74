"""The one exception type that means "the user's input is wrong".

The CLI turns a :class:`UserError` into a one-line message on stderr and exit
status 2, without a traceback. Library code raises it for anything the user can
fix (a missing file, an unknown option value, an empty split); everything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
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


JSON_ERRORS = (ValueError, RecursionError)
"""What parsing a JSON text may raise: malformed text (``json.JSONDecodeError``), an integer longer than
Python's digit limit (``ValueError``), nesting deeper than the recursion limit (``RecursionError``)."""


def json_problem(exc: BaseException) -> str:
    """One line saying why a JSON text did not parse (``exc`` one of :data:`JSON_ERRORS`)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "not readable JSON (nested too deeply)"
    first = str(exc).split(":")[0].strip() or type(exc).__name__
    return f"not readable JSON ({first})"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a host or accelerator out-of-memory error (``MemoryError``, ``torch.OutOfMemoryError``, or a
    backend's ``RuntimeError`` saying "out of memory"), which is neither bad input nor a bug."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" \
        or isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
