"""Ids of runs and workflows: UUIDs of version 7 (RFC 9562), in hex.

A version 7 UUID begins with the Unix time in milliseconds, then 74 random bits. Ids
made close in time sort close together, so the rows a burst of work inserts and then
updates share a few pages of each index keyed by id (the runs' primary key, the
attempts' and journal's run and workflow ids), where random ids (version 4) touch a
page per row: every page a transaction touches is written to the WAL at its commit,
and read back by the next connection whose cache that commit invalidated. Uniqueness
is the random bits' (2^74 per millisecond); the order is only a hint, never relied on.

(Python 3.14 has `uuid.uuid7`; this is the same layout for the Pythons before it.)
"""

from __future__ import annotations

import os
import time

_RAND_B = (1 << 62) - 1


def new_id() -> str:
    """A new id: 32 hex digits, a version 7 UUID."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits; 74 are kept
    value = (
        (ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76  # version
        | (rand >> 68) << 64  # rand_a: 12 bits
        | 0b10 << 62  # variant
        | rand & _RAND_B  # rand_b: 62 bits
    )
    return f"{value:032x}"
