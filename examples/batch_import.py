"""A batch import: 1,000 rows in batches of 100, one checkpointed step per batch.

    python examples/batch_import.py [--db URL]

Batch 4 hits a transient error the first time. Only that batch is retried: the
batches already imported are not imported again, whatever happens to the workers.
"""

from __future__ import annotations

from collections import Counter

from retrier import Retrier
from workflow import WorkflowContext, WorkflowManager
from workpool import RetryBehavior, Workpool

ROWS = [{"sku": f"sku-{i}", "qty": i % 7} for i in range(1000)]
BATCH = 100


def main(db: str) -> None:
    retrier = Retrier(db)
    pool = Workpool(retrier, "imports", max_parallelism=2, retry_actions_by_default=True,
                    default_retry_behavior=RetryBehavior(max_attempts=3, initial_backoff_ms=50))
    workflows = WorkflowManager(pool)
    imported: Counter[int] = Counter()
    calls: Counter[int] = Counter()

    @retrier.action
    def import_batch(batch: int, rows: list[dict[str, int | str]]) -> int:
        calls[batch] += 1
        if batch == 4 and calls[batch] == 1:
            raise ConnectionError("warehouse API timed out")
        imported[batch] += len(rows)
        return len(rows)

    @workflows.define
    async def import_file(ctx: WorkflowContext, name: str) -> int:
        total = 0
        for batch, start in enumerate(range(0, len(ROWS), BATCH)):
            rows = ROWS[start : start + BATCH]
            total += await ctx.step(f"batch-{batch}", import_batch,
                                    {"batch": batch, "rows": rows})
        return total

    with retrier:
        wf_id = workflows.start(import_file, {"name": "stock.csv"})
        print(f"imported: {workflows.wait(wf_id, timeout=60).result}")
    for step in workflows.steps(wf_id):
        print(f"  {step.name:9} {step.state:9} attempts={step.attempts}")
    print(f"rows imported per batch: {sorted(set(imported.values()))}; "
          f"calls of batch 4: {calls[4]}, of the others: {max(calls[b] for b in calls if b != 4)}")
    retrier.close()


if __name__ == "__main__":
    from _run import run_with_db  # examples/_run.py, beside this file

    run_with_db(main, __doc__)
