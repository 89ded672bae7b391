"""Poll a run's status from app code, then clean it up.

    python examples/poll_status.py [--db URL]

A flaky "thumbnail" action fails twice and succeeds on the third attempt; the app
polls `status` the way a web page would, prints each change, then deletes the
finished run's state with `cleanup` (otherwise it is deleted after 7 days).
"""

from __future__ import annotations

import time

from retrier import Completed, InProgress, Retrier, RunNotFound


def main(db: str) -> None:
    retrier = Retrier(db, initial_backoff_ms=100)
    attempts = {"count": 0}

    @retrier.action
    def make_thumbnail(image: str, width: int) -> dict[str, str]:
        attempts["count"] += 1
        if attempts["count"] < 3:
            raise ConnectionError("image store timed out")
        return {"thumbnail": f"{image}@{width}px"}

    with retrier:
        run_id = retrier.run(make_thumbnail, {"image": "cat.png", "width": 128})
        last = None
        while True:
            status = retrier.status(run_id)
            if status != last:
                print(f"status: {status}")
                last = status
            if isinstance(status, Completed):
                break
            assert isinstance(status, InProgress)
            time.sleep(0.02)
        retrier.wait(run_id, timeout=10)  # on_complete handlers (none here) have run

    print(f"attempts: {attempts['count']}")
    retrier.cleanup(run_id)
    try:
        retrier.status(run_id)
    except RunNotFound as exc:
        print(f"after cleanup: {exc}")
    retrier.close()


if __name__ == "__main__":
    from _run import run_with_db  # examples/_run.py, beside this file

    run_with_db(main, __doc__)
