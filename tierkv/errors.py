"""The base class of every error a user can fix, so callers (the CLI, applications) can tell them
from bugs.

Why this module exists: the CLI prints user errors as one line and exit code 2 but must let
internal bugs show their traceback; catching ``ValueError`` wholesale hid bugs, and some user
errors (a full tier, pinning refused) were not ``ValueError`` s at all. Every user-facing error
class in tierkv derives from ``TierkvError`` (itself a ``ValueError``, for compatibility with
code that caught that), and nothing else does. A new user error joins by subclassing it.
"""

from __future__ import annotations


class TierkvError(ValueError):
    """An input, file, budget or machine state the user can fix; the message says how."""


class ArgumentError(TierkvError):
    """An argument (prompt, sampling option, budget, device, policy field) has an unusable value."""


__all__ = ["ArgumentError", "TierkvError"]
