"""The app that worker processes in tests/test_schedule_processes.py run.

`tiers worker tests.cron_app:retrier` builds the Retrier from TIERS_TEST_DB; its
one action is what a schedule fires every second.
"""

from __future__ import annotations

import os
from datetime import timedelta
from functools import cache
from typing import Any

from retrier import Retrier


def build(url: str) -> Retrier:
    retrier = Retrier(url, lease=timedelta(seconds=2), poll_interval=timedelta(milliseconds=50))

    @retrier.action(name="beat")
    def beat() -> int:
        return os.getpid()

    return retrier


@cache
def _from_env() -> Retrier:
    return build(os.environ["TIERS_TEST_DB"])


def __getattr__(name: str) -> Any:
    if name == "retrier":
        return _from_env()
    raise AttributeError(name)
