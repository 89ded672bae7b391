"""SQLite's wake-ups between processes (`retrier._pings`): a sender reaches every live
worker's socket but its own, and clears away the sockets of workers that died."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from retrier._pings import Pings

pytestmark = pytest.mark.skipif(not Pings.available(), reason="no Unix sockets here")


def dead_socket(directory: Path, name: str) -> Path:
    """A socket file whose worker is gone (bound, then closed)."""
    path = directory / name
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.close()
    return path


def test_a_ping_reaches_other_workers_not_its_own_and_clears_dead_sockets(
    tmp_path: Path,
) -> None:
    database = str(tmp_path / "tiers.db")
    worker_side, sender = Pings(database), Pings(database)
    other = worker_side.bind()
    own = sender.bind()
    assert other is not None and own is not None
    try:
        dead = [dead_socket(sender.directory, f"0-dead{i}.sock") for i in range(3)]
        sender.send("wake", "t=1", fresh=True)
        assert other.drain() == [("wake", "t=1")]
        assert own.drain() == []  # its Retrier wakes its own workers in-process
        assert [p for p in dead if p.exists()] == [], "every dead socket is cleared at once"
    finally:
        other.close()
        own.close()
        worker_side.close()
        sender.close()
