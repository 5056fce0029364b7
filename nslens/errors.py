"""The user-error type: what nslens raises for bad input or an environment it cannot work in (a model that is
not served, a file that is truncated, a server that does not answer), as opposed to a bug.

``NsLensError`` subclasses ``ValueError`` so that code catching ``ValueError`` keeps working. The CLI prints an
``NsLensError`` as one line (exit 1); any other exception is an internal error and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["NsLensError"]


class NsLensError(ValueError):
    """A user error: its message is one line naming the problem and, where there are any, the valid choices."""
