"""`tiers pools ...`: the workpool's commands, loaded through the `tiers.cli` entry point."""

from __future__ import annotations

import click
from rich.table import Table

from retrier.engine import (
    RUNNING,
    CliContext,
    QueueLimits,
    console,
    format_ms,
    or_exit,
    print_listing,
)

from ._admin import set_cap, set_group_cap, set_key_limit, stored_pool

_HOUR_MS = 3_600_000


@click.group()
def pools() -> None:
    """Inspect workpools: their limits and what they are doing."""


@pools.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@click.pass_obj
def pools_list(obj: CliContext, as_json: bool) -> None:
    """Every pool: its cap, its group (and guarantee), running and pending items,
    failures in the last hour."""
    store = obj.store()
    since = store.clock.now_ms() - _HOUR_MS
    rows = []
    for limits in store.list_queues():
        counts = store.queue_counts(limits.name, since)
        rows.append({
            "pool": limits.name,
            "cap": limits.max_parallelism if as_json else _cap(limits),
            "group": limits.group_name if as_json else _group(limits),
            "guaranteed": limits.guaranteed,
            "running": counts["running"],
            "pending": counts["pending"],
            "failed_1h": counts["failed"],
        })
    columns = ("pool", "cap", "group", "running", "pending", "failed_1h")
    print_listing(columns, rows, as_json, "pool(s)")


@pools.command("show")
@click.argument("name")
@click.pass_obj
def pools_show(obj: CliContext, name: str) -> None:
    """One pool: its limits, counts and the items running now."""
    store = obj.store()
    limits = or_exit(stored_pool, store, name)
    counts = store.queue_counts(name, store.clock.now_ms() - _HOUR_MS)
    info = Table(show_header=False)
    for label, value in [
        ("pool", name),
        ("max_parallelism", _cap(limits)),
        ("rate_limit", _rate(limits)),
        ("max_per_key", _or_none(limits.max_per_key)),
        ("rate_limit_per_key", _key_rate(limits)),
        ("max_per_worker", _or_none(limits.max_per_worker)),
        ("group", _group(limits)),
        ("priority_aging", _aging(limits)),
        ("keys", "take turns (round-robin)" if limits.round_robin else "pool order"),
        ("running", str(counts["running"])),
        ("pending", str(counts["pending"])),
        ("failed (1 h)", str(counts["failed"])),
    ]:
        info.add_row(label, value)
    console.print(info)
    group = store.get_group(limits.group_name) if limits.group_name else None
    if group is not None:
        members = Table(
            "pool", "guaranteed", "max_parallelism", "running",
            title=f"group {group.name}: {group.running} of {group.max_parallelism} running",
        )
        for m in group.members:
            members.add_row(m.name, str(m.guaranteed), _or_none(m.max_parallelism),
                            str(m.running))
        console.print(members)
    own = store.key_limits(name)
    if own:
        caps = Table("key", "max_parallelism", title="key limits")
        for key, cap in own.items():
            caps.add_row(key, "0 (paused)" if cap == 0 else str(cap))
        console.print(caps)
    running = Table("id", "function", "key", "attempt", "started", title="running")
    for row in store.list_runs(state=RUNNING, queue=name, limit=50):
        running.add_row(row.id, row.fn, row.key or "", str(row.attempts), format_ms(row.started_ms))
    console.print(running)


@pools.command("set-cap")
@click.argument("name")
@click.argument("max_parallelism", type=int)
@click.pass_obj
def pools_set_cap(obj: CliContext, name: str, max_parallelism: int) -> None:
    """Change a pool's cap for every worker (0 pauses it; running items finish)."""
    limits = or_exit(set_cap, obj.store(), name, max_parallelism)
    console.print(f"{name}: cap {_cap(limits)}")


@pools.command("set-key-limit")
@click.argument("name")
@click.argument("key")
@click.argument("max_parallelism", required=False, type=int)
@click.option("--remove", is_flag=True, help="Remove the key's own cap (back to max_per_key).")
@click.pass_obj
def pools_set_key_limit(
    obj: CliContext, name: str, key: str, max_parallelism: int | None, remove: bool
) -> None:
    """Give one key (a tenant) of a pool a cap of its own (0 pauses the key), or
    --remove it; every worker applies it at its next claim."""
    if remove == (max_parallelism is not None):
        raise click.UsageError("give either MAX_PARALLELISM or --remove")
    or_exit(set_key_limit, obj.store(), name, key, max_parallelism)
    shown = "removed" if max_parallelism is None else f"cap {max_parallelism}"
    console.print(f"{name}: key {key!r} {shown}")


@pools.command("set-group-cap")
@click.argument("group")
@click.argument("max_parallelism", type=int)
@click.pass_obj
def pools_set_group_cap(obj: CliContext, group: str, max_parallelism: int) -> None:
    """Change a pool group's shared cap for every worker (not below the sum of its
    members' guarantees; running items finish)."""
    stored = or_exit(set_group_cap, obj.store(), group, max_parallelism)
    console.print(f"group {group}: cap {stored.max_parallelism}, {stored.running} running")


def _group(limits: QueueLimits) -> str:
    if limits.group_name is None:
        return ""
    return f"{limits.group_name} (guaranteed {limits.guaranteed or 0})"


def _key_rate(limits: QueueLimits) -> str:
    if limits.key_rate_limit is None or not limits.key_rate_period_ms:
        return "none"
    return f"{limits.key_rate_limit} per {limits.key_rate_period_ms / 1000:g} s per key"


def _aging(limits: QueueLimits) -> str:
    if not limits.priority_aging_ms:
        return "none (due order)"
    return f"{limits.priority_aging_ms / 1000:g} s"


def _cap(limits: QueueLimits) -> str:
    if limits.max_parallelism is None:
        return "unlimited"
    return "0 (paused)" if limits.max_parallelism == 0 else str(limits.max_parallelism)


def _or_none(limit: int | None) -> str:
    return "none" if limit is None else str(limit)


def _rate(limits: QueueLimits) -> str:
    if limits.rate_limit is None or not limits.rate_period_ms:
        return "none"
    return f"{limits.rate_limit} per {limits.rate_period_ms / 1000:g} s"
