"""An on_complete handler that writes to the app's own table, exactly once.

    python examples/transactional_on_complete.py [--db URL]

The handler declares a `session` parameter, so its writes commit in the same
transaction that marks the run's completion delivered: the order row is updated
exactly once per run, even if a worker dies or the handler fails and is retried.
The order itself is created with its charge run in one transaction (`session=`):
if the app's transaction rolls back, no charge is ever attempted.
"""

from __future__ import annotations

from sqlmodel import Field, Session, SQLModel, select

from retrier import Retrier, RunResult, Success


class Order(SQLModel, table=True):
    __tablename__ = "example_orders"
    id: int | None = Field(default=None, primary_key=True)
    customer: str
    amount: int
    status: str = "pending"
    charge_id: str | None = None


def main(db: str) -> None:
    retrier = Retrier(db)
    SQLModel.metadata.create_all(retrier.engine, tables=[Order.__table__])  # type: ignore[list-item]

    @retrier.action
    def charge_card(customer: str, amount: int) -> str:
        return f"ch_{customer}_{amount}"

    @retrier.on_complete
    def record_charge(run_id: str, result: RunResult, context: dict[str, int],
                      session: Session) -> None:
        order = session.get(Order, context["order_id"])
        assert order is not None
        if isinstance(result, Success):
            order.status, order.charge_id = "paid", result.value
        else:
            order.status = f"charge {result.kind}"
        session.add(order)

    # The order and its charge are written together, or not at all.
    with Session(retrier.engine) as session:
        order = Order(customer="ann", amount=42)
        session.add(order)
        session.flush()
        assert order.id is not None
        run_id = retrier.run(charge_card, {"customer": "ann", "amount": 42},
                             on_complete=record_charge, context={"order_id": order.id},
                             session=session)
        session.commit()

    with retrier:
        retrier.wait(run_id, timeout=10)

    with Session(retrier.engine) as session:
        for row in session.exec(select(Order)):
            print(f"order {row.id}: {row.customer} {row.amount} -> {row.status} ({row.charge_id})")
    retrier.close()


if __name__ == "__main__":
    from _run import run_with_db  # examples/_run.py, beside this file

    run_with_db(main, __doc__)
