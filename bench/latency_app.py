"""The app bench.latency's worker process runs (`bench.latency_app:retrier`).

One action, `stamp`, that appends "enqueued started" (time.time() at its start) to the
file named by TIERS_BENCH_STAMPS. Default worker settings: the benchmark measures the
wake-up path between processes, not a short poll.
"""

from __future__ import annotations

import os
import time
from functools import cache
from typing import Any

from retrier import Retrier


def build(url: str, stamps: str, **options: Any) -> Retrier:
    retrier = Retrier(url, **options)

    @retrier.action(name="stamp")
    async def stamp(enqueued: float, seq: int) -> None:
        started = time.time()
        fd = os.open(stamps, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{seq} {enqueued!r} {started!r}\n".encode())
        finally:
            os.close(fd)

    return retrier


@cache
def _from_env() -> Retrier:
    return build(
        os.environ["TIERS_BENCH_DB"],
        os.environ["TIERS_BENCH_STAMPS"],
        concurrency=int(os.environ.get("TIERS_BENCH_C", "16")),
        durability=os.environ.get("TIERS_BENCH_DURABILITY", "normal"),
    )


def __getattr__(name: str) -> Any:
    if name == "retrier":
        return _from_env()
    raise AttributeError(name)
