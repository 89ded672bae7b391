"""Changing a stored pool's cap (or a key's own cap, or a pool group's cap) without
its `Workpool` object: what `tiers pools set-cap` / `set-key-limit` /
`set-group-cap` and the dashboard do (the same checks and writes as
`set_max_parallelism` and `set_key_limit`)."""

from __future__ import annotations

import dataclasses

from retrier.engine import QueueGroup, QueueLimits, Store, check_name

from ._errors import PoolGroupNotFound, PoolNotFound
from ._settings import check_parallelism


def stored_pool(store: Store, name: str) -> QueueLimits:
    limits = store.get_queue(name)
    if limits is None:
        raise PoolNotFound(name)
    return limits


def set_cap(store: Store, name: str, max_parallelism: int) -> QueueLimits:
    """Store pool `name`'s new cap (0 pauses it); every worker applies it at its next
    claim, and running items are never stopped. Raises `PoolNotFound`, or
    `InvalidSettings` for a cap out of 0-100,000."""
    check_parallelism(max_parallelism)
    limits = dataclasses.replace(stored_pool(store, name), max_parallelism=max_parallelism)
    store.set_queue(limits)  # wakes the workers of every process once committed
    return limits


def set_key_limit(store: Store, name: str, key: str, max_parallelism: int | None) -> None:
    """Give `key` of pool `name` a cap of its own (None: remove it), as
    `Workpool.set_key_limit` does. Raises `PoolNotFound`, or `InvalidSettings` for a
    bad key or a cap out of 0-100,000."""
    check_name(key, "a key")
    if max_parallelism is not None:
        check_parallelism(max_parallelism)
    stored_pool(store, name)
    store.set_key_limit(name, key, max_parallelism)


def stored_group(store: Store, name: str) -> QueueGroup:
    group = store.get_group(name)
    if group is None:
        raise PoolGroupNotFound(name)
    return group


def set_group_cap(store: Store, name: str, max_parallelism: int) -> QueueGroup:
    """Store pool group `name`'s new cap, as `PoolGroup.set_max_parallelism` does.
    Raises `PoolGroupNotFound`, or `InvalidSettings` for a cap out of 0-100,000 or
    below its members' guarantees (nothing written)."""
    check_parallelism(max_parallelism)
    stored_group(store, name)
    store.set_group(name, max_parallelism)  # wakes the workers once committed
    return stored_group(store, name)
