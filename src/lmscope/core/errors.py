"""The one exception type lmscope raises for bad input.

The CLI turns an :class:`LmscopeError` into a one-line message and exit code 2;
anything else is a bug and keeps its traceback.
"""


class LmscopeError(ValueError):
    """Bad input from the user: unknown site, head out of range, missing file, ..."""


class UnknownFamily(LmscopeError):
    """A model whose ``model_type`` has no family entry (:mod:`lmscope.core.families`)."""
