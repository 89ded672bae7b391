"""Wake-ups between processes sharing one SQLite file: a Unix datagram socket per
worker in a directory named after the database, pinged after a commit that leaves
work to do. Only hints, like PostgreSQL's NOTIFY (the worker then reads the
database); polling stays the safety net where a ping cannot go (another OS user, a
platform without Unix sockets).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger("tiers.store")


class PingReceiver:
    """One worker's socket: read on the worker's event loop when readable, so a ping
    costs no thread of its own, and a burst of pings is read at once."""

    def __init__(self, sock: socket.socket, path: Path, own: set[str]) -> None:
        self.socket = sock
        self._path = path
        self._own = own

    def drain(self) -> list[tuple[str, str]]:
        """Every ping waiting on the socket, as (kind, payload); never blocks."""
        pings: list[tuple[str, str]] = []
        while True:
            try:
                message = self.socket.recv(512)
            except OSError:  # nothing more waiting (or closed)
                return pings
            kind, _, payload = message.decode(errors="replace").partition(":")
            pings.append((kind, payload))

    def close(self) -> None:
        self.socket.close()
        self._own.discard(str(self._path))
        with contextlib.suppress(OSError):
            self._path.unlink()

_SUFFIX = ".sock"
_RESCAN_S = 0.1  # how often a sender reads who listens


def ping_directory(database: str) -> Path:
    """Where the workers of one database file keep their sockets: a short path (a Unix
    socket's is limited to about 100 bytes), the same for every process."""
    digest = hashlib.sha256(os.path.realpath(database).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"tiers-{digest}"


class Pings:
    """Sends pings to the workers of one database, and lets a worker receive them."""

    def __init__(self, database: str) -> None:
        self.directory = ping_directory(database)
        self._sender: socket.socket | None = None
        self._lock = threading.Lock()
        self._own: set[str] = set()  # the sockets of workers woken in-process already
        self._peers: list[str] = []  # the sockets found in the directory, when last read
        self._scanned_at = -math.inf

    @staticmethod
    def available() -> bool:
        return hasattr(socket, "AF_UNIX")

    def send(self, kind: str, payload: str = "", *, fresh: bool = False) -> None:
        """Ping every worker of the database but those listening through this object
        (their Retrier wakes them in-process); never blocks, never raises.

        Who listens is read from the directory at most every `_RESCAN_S`: a syscall
        per enqueue would hand the GIL to the worker's thread and wait to get it back
        (measured: 111 us per enqueue in a flood with an in-process worker). A worker
        that starts meanwhile reads the database once listening, then polls. `fresh`
        reads it now (a rare hint that must not wait for a poll: a cancel)."""
        now = time.monotonic()
        if fresh or now - self._scanned_at > _RESCAN_S:
            self._scanned_at = now
            try:
                entries = [e.path for e in os.scandir(self.directory)]
            except OSError:
                entries = []  # no worker has listened yet
            self._peers = [p for p in entries if p.endswith(_SUFFIX)]
        message = f"{kind}:{payload}".encode()
        for path in list(self._peers):  # _forget may remove one as we go
            if path in self._own:
                continue
            try:
                self._socket().sendto(message, path)
            except (ConnectionRefusedError, FileNotFoundError):
                self._forget(path)  # a worker that died: its socket stays behind
            except OSError:
                pass  # its queue is full (it has a wake-up waiting already), or gone

    def _forget(self, path: str) -> None:
        with contextlib.suppress(ValueError):
            self._peers.remove(path)
        with contextlib.suppress(OSError):
            os.unlink(path)

    def bind(self) -> PingReceiver | None:
        """A socket of this worker's own that pings reach (None if pings cannot work
        here); read it with `PingReceiver.drain` when it is readable."""
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            path = self.directory / f"{os.getpid()}-{uuid.uuid4().hex[:8]}{_SUFFIX}"
            receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            receiver.setblocking(False)
            receiver.bind(str(path))
        except OSError as exc:
            log.info("no local wake-ups for this database (%s); polling only", exc)
            return None
        self._own.add(str(path))
        return PingReceiver(receiver, path, self._own)

    def close(self) -> None:
        with self._lock:
            if self._sender is not None:
                self._sender.close()
                self._sender = None

    def _socket(self) -> socket.socket:
        with self._lock:
            if self._sender is None:
                self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sender.setblocking(False)
            return self._sender
