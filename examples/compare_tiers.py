"""The same job done by each tier: charge a card, send a confirmation, save the order.

    python examples/compare_tiers.py                     # SQLite, in a temporary file
    python examples/compare_tiers.py --db postgresql+psycopg://postgres@127.0.0.1/test
    python examples/compare_tiers.py --orders 50

The "orders database" is flaky: saving each order fails the first time. Each tier
processes the same orders and the table shows what it cost:

- retrier: one durable run per order; a failure retries the whole action, so the
  customer is charged and emailed again.
- workpool: the same action as pool items, at most 4 at once (the payment provider's
  limit); the same duplicates, but the cap holds across every worker.
- workflow: three checkpointed steps; the failed save is retried alone, and the
  charge and the email happen exactly once.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from retrier import Completed, Retrier, Success
from workflow import WorkflowContext, WorkflowManager
from workpool import Workpool

EFFECT_LATENCY = 0.02  # seconds each call to a "remote" dependency takes
POOL_CAP = 4


@dataclass
class Ledger:
    """What actually happened in the outside world, per tier (thread-safe)."""

    effects: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    running: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def effect(self, tier: str, order_id: str, what: str) -> int:
        """Record a side effect; returns how many times it has now happened."""
        time.sleep(EFFECT_LATENCY)
        with self.lock:
            self.effects[(tier, order_id, what)] += 1
            return self.effects[(tier, order_id, what)]

    def enter(self, tier: str) -> None:
        with self.lock:
            self.calls[tier] += 1
            self.running[tier] += 1
            self.peak[tier] = max(self.peak[tier], self.running[tier])

    def leave(self, tier: str) -> None:
        with self.lock:
            self.running[tier] -= 1

    def duplicates(self, tier: str) -> int:
        return sum(n - 1 for (t, _, _), n in self.effects.items() if t == tier and n > 1)


def build(db: str, ledger: Ledger) -> tuple[Retrier, Workpool, WorkflowManager]:
    retrier = Retrier(db, initial_backoff_ms=50, concurrency=32)

    def save_order(tier: str, order_id: str) -> str:
        if ledger.effect(tier, order_id, "save attempt") == 1:
            raise ConnectionError("orders database timed out")
        ledger.effect(tier, order_id, "saved")
        return f"saved {order_id}"

    # Tiers 1 and 2: the whole job is one action.
    @retrier.action
    def process_order(tier: str, order_id: str) -> str:
        ledger.enter(tier)
        try:
            ledger.effect(tier, order_id, "charge")
            ledger.effect(tier, order_id, "email")
            return save_order(tier, order_id)
        finally:
            ledger.leave(tier)

    # Tier 3: each part is its own step.
    @retrier.action
    def charge_card(order_id: str) -> str:
        ledger.enter("workflow")
        try:
            ledger.effect("workflow", order_id, "charge")
            return f"ch_{order_id}"
        finally:
            ledger.leave("workflow")

    @retrier.action
    def send_confirmation(order_id: str) -> None:
        ledger.enter("workflow")
        try:
            ledger.effect("workflow", order_id, "email")
        finally:
            ledger.leave("workflow")

    @retrier.action
    def save(order_id: str) -> str:
        ledger.enter("workflow")
        try:
            return save_order("workflow", order_id)
        finally:
            ledger.leave("workflow")

    pool = Workpool(retrier, "orders", max_parallelism=POOL_CAP, retry_actions_by_default=True)
    step_pool = Workpool(retrier, "order-steps", max_parallelism=POOL_CAP,
                         retry_actions_by_default=True)
    workflows = WorkflowManager(step_pool)

    @workflows.define
    async def order_flow(ctx: WorkflowContext, order_id: str) -> str:
        await ctx.step("charge", charge_card, {"order_id": order_id})
        await ctx.step("email", send_confirmation, {"order_id": order_id})
        return str(await ctx.step("save", save, {"order_id": order_id}))

    return retrier, pool, workflows


def run_tier(tier: str, orders: list[str], retrier: Retrier, pool: Workpool,
             workflows: WorkflowManager, progress: Progress) -> tuple[float, int]:
    """Process every order with one tier; returns (seconds, orders that succeeded)."""
    task = progress.add_task(f"{tier:9}", total=len(orders))
    start = time.perf_counter()
    if tier == "retrier":
        ids = [retrier.run("process_order", {"tier": tier, "order_id": o}) for o in orders]
        status = retrier.status
    elif tier == "workpool":
        ids = pool.enqueue_batch([("process_order", {"tier": tier, "order_id": o})
                                  for o in orders])
        status = retrier.status
    else:
        ids = [workflows.start("order_flow", {"order_id": o}) for o in orders]
        status = workflows.status
    left = set(ids)
    while left:
        left = {i for i in left if not isinstance(status(i), Completed)}
        progress.update(task, completed=len(orders) - len(left))
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    succeeded = sum(1 for i in ids if isinstance(_result(status(i)), Success))
    return seconds, succeeded


def _result(status: Any) -> Any:
    return status.result if isinstance(status, Completed) else None


def main(db: str, count: int) -> None:
    console = Console(width=max(Console().width, 100))
    ledger = Ledger()
    retrier, pool, workflows = build(db, ledger)
    orders = [f"o{i}" for i in range(count)]
    rows = []
    with retrier, Progress(console=console, transient=True) as progress:
        for tier in ("retrier", "workpool", "workflow"):
            seconds, ok = run_tier(tier, orders, retrier, pool, workflows, progress)
            rows.append((tier, ok, seconds))
    table = Table(title=f"{count} orders; saving each fails once (a flaky database)")
    for column in ("tier", "succeeded", "runs", "charges", "emails",
                   "extra side effects", "most at once", "wall time"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for tier, ok, seconds in rows:
        charges = sum(n for (t, _, what), n in ledger.effects.items()
                      if t == tier and what == "charge")
        emails = sum(n for (t, _, what), n in ledger.effects.items()
                     if t == tier and what == "email")
        table.add_row(tier, f"{ok}/{count}", str(ledger.calls[tier]), str(charges),
                      str(emails), str(ledger.duplicates(tier) - count),
                      str(ledger.peak[tier]), f"{seconds:.2f} s")
    console.print(table)
    console.print(
        "Runs: action (or step) executions. Extra side effects: charges, emails and "
        "saves beyond one per order (the injected failed save not counted). "
        "Retries alone re-run the whole action: the retrier and the workpool charged and "
        "emailed every customer twice. The workflow retried only the failed step."
    )
    retrier.close()


if __name__ == "__main__":
    # Worker start/stop lines would clutter the table; TIERS_LOG_LEVEL=INFO shows them.
    os.environ.setdefault("TIERS_LOG_LEVEL", "WARNING")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", help="database URL (default: a temporary SQLite file)")
    parser.add_argument("--orders", type=int, default=20)
    args = parser.parse_args()
    if args.db:
        main(args.db, args.orders)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(f"sqlite:///{tmp}/tiers.db", args.orders)
