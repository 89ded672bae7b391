"""What a journal write tells its caller by raising: the driver then suspends (or
rolls the transaction back) instead of going on."""

from __future__ import annotations


class Conflict(Exception):
    """Another driver of the same workflow wrote this journal entry first."""


class Unsettled(Exception):
    """An inline step's outcome did not complete; its transaction must roll back."""


class NotRunning(Exception):
    """The workflow is no longer running (canceled, or finished by another driver)."""
