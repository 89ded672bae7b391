"""The command line the examples share: `--db URL`, or a temporary SQLite file."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable


def run_with_db(main: Callable[[str], None], doc: str | None) -> None:
    # Worker start/stop lines would clutter the demo; TIERS_LOG_LEVEL=INFO shows them.
    os.environ.setdefault("TIERS_LOG_LEVEL", "WARNING")
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--db", help="database URL (default: a temporary SQLite file)")
    args = parser.parse_args()
    if args.db:
        main(args.db)
        return
    with tempfile.TemporaryDirectory() as tmp:
        main(f"sqlite:///{tmp}/tiers.db")
