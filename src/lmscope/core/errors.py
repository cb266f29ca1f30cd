"""The one exception type lmscope raises for bad input.

The CLI turns an :class:`LmscopeError` into a one-line message and exit code 2;
anything else is a bug and keeps its traceback.
"""


class LmscopeError(ValueError):
    """Bad input from the user: unknown site, head out of range, missing file, ..."""
