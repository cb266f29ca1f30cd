"""The one exception type lmscope raises for bad input.

The CLI turns an :class:`LmscopeError` into a one-line message and exit code 2;
anything else is a bug and keeps its traceback.
"""


class LmscopeError(ValueError):
    """Bad input from the user: unknown site, head out of range, missing file, ..."""


class UnknownFamily(LmscopeError):
    """A model whose ``model_type`` has no family entry (:mod:`lmscope.core.families`)."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """``"TypeName: first line of the message"`` (at most ``limit`` characters of it), for one-line
    errors that wrap an exception raised by another library."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit] if text else ''}"
