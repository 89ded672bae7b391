"""Fan out 20 jobs through a pool that runs at most 3 at once, on SQLite.

    python examples/fan_out_pool.py

Each job records how many jobs were running when it started; the maximum is 3.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from retrier import Retrier, RunResult, Success
from workpool import RetryBehavior, Workpool

db = Path(tempfile.mkdtemp()) / "fan_out.db"
retrier = Retrier(f"sqlite:///{db}")
pool = Workpool(
    retrier,
    "thumbnails",
    max_parallelism=3,
    retry_actions_by_default=True,
    default_retry_behavior=RetryBehavior(max_attempts=3, initial_backoff_ms=100),
)

running = 0
peak = 0
lock = threading.Lock()


@retrier.action
def make_thumbnail(image: str) -> str:
    global running, peak
    with lock:
        running += 1
        peak = max(peak, running)
    time.sleep(0.05)  # the real work
    with lock:
        running -= 1
    return f"{image}.thumb.png"


@retrier.on_complete
def thumbnail_done(run_id: str, result: RunResult, context: Any) -> None:
    if isinstance(result, Success):
        # One write per line: handlers run on several threads at once.
        sys.stdout.write(f"album {context['album']}: {result.value}\n")


if __name__ == "__main__":
    with retrier:  # an in-process worker; `tiers worker examples.fan_out_pool:pool` also works
        ids = pool.enqueue_batch(
            [
                (make_thumbnail, {"image": f"img{i:02}"},
                 {"on_complete": thumbnail_done, "context": {"album": "summer"}})
                for i in range(20)
            ]
        )
        for work_id in ids:
            pool.wait(work_id, timeout=30)
    print(f"20 thumbnails, at most {peak} at once (cap {pool.max_parallelism})")
    assert peak <= 3
