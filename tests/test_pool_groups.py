"""Pool groups (`PoolGroup`): a cap shared by several pools, each with a guaranteed
minimum, borrowing the slots the others leave idle; on SQLite and PostgreSQL.

Claims are made by hand (`store.claim`) on a FakeClock, so each test says exactly what
a worker's next claim starts. That the Python and the PostgreSQL claims agree on a
longer sequence is tests/test_claims.py; that the cap holds across worker processes
is tests/test_pool_groups_processes.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from click.testing import CliRunner

from retrier import FakeClock, InvalidSettings, Retrier
from retrier import _explain as reasons
from retrier._cli import main as cli
from retrier.engine import Claimed, Outcome
from workpool import PoolGroup, Workpool

MakeRetrier = Callable[..., Retrier]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(make_retrier: MakeRetrier, clock: FakeClock) -> Retrier:
    retrier = make_retrier(clock=clock)

    @retrier.action(name="work")
    def work(i: int = 0) -> None: ...

    return retrier


def claim(retrier: Retrier, limit: int = 100) -> list[Claimed]:
    claimed, _ = retrier.store.claim("w", limit, 60_000)
    return claimed


def by_pool(claimed: list[Claimed]) -> dict[str, int]:
    return dict(Counter(c.queue for c in claimed))


def finish(retrier: Retrier, claimed: list[Claimed]) -> None:
    retrier.store.record(
        [Outcome(c.id, c.fence, "success", c.started_ms, attempt=c.attempts, queue=c.queue)
         for c in claimed],
        "w",
        60_000,
    )


def fill(pool: Workpool, n: int) -> list[str]:
    return pool.enqueue_batch([("work", {"i": i}) for i in range(n)])


def gpu_pools(retrier: Retrier) -> tuple[PoolGroup, Workpool, Workpool, Workpool]:
    gpu = PoolGroup(retrier, "gpu", max_parallelism=6)
    train = Workpool(retrier, "train", max_parallelism=6, group=gpu, guaranteed=3)
    infer = Workpool(retrier, "infer", max_parallelism=6, group=gpu, guaranteed=2)
    batch = Workpool(retrier, "batch", max_parallelism=6, group="gpu")  # borrows only
    return gpu, train, infer, batch


def test_a_pool_borrows_the_slots_idle_pools_leave(fake: Retrier) -> None:
    _, train, _, _ = gpu_pools(fake)
    fill(train, 10)
    assert by_pool(claim(fake)) == {"train": 6}, "infer's and batch's idle slots lent"
    assert claim(fake) == [], "the group's cap holds"


def test_an_idle_pool_never_blocks_the_others(fake: Retrier) -> None:
    """Guarantees of pools with nothing due reserve nothing: a pool without a
    guarantee fills the whole group."""
    _, _, _, batch = gpu_pools(fake)
    fill(batch, 10)
    assert by_pool(claim(fake)) == {"batch": 6}


def test_a_lent_guarantee_comes_back_as_borrowed_items_finish(fake: Retrier) -> None:
    _, train, infer, _ = gpu_pools(fake)
    fill(train, 20)
    first = claim(fake)
    assert by_pool(first) == {"train": 6}
    fill(infer, 5)
    assert claim(fake) == [], "nothing is preempted: infer waits for a free slot"
    finish(fake, first[:1])
    assert by_pool(claim(fake)) == {"infer": 1}, "the freed slot goes to infer's guarantee"
    finish(fake, first[1:4])
    # train runs 2 (below its 3), infer 1 (of its 2): 3 free slots, 1 reserved for
    # each, and 1 beyond them, which the first pool in claim order borrows (their
    # items are due alike: pools in name order).
    assert by_pool(claim(fake)) == {"infer": 2, "train": 1}
    assert claim(fake) == []


def test_borrowing_stops_at_the_other_pools_unmet_guarantees(fake: Retrier) -> None:
    _, train, infer, batch = gpu_pools(fake)
    fill(infer, 1)  # infer's guarantee of 2 reserves 1: it has one item due
    fill(batch, 10)
    taken = claim(fake, 3)  # batch's items due first: 3 of them, infer's 1 reserved
    assert by_pool(taken) == {"batch": 3}
    assert by_pool(claim(fake)) == {"batch": 2, "infer": 1}
    fill(train, 5)
    assert claim(fake) == [], "the group is full"


def test_a_pool_within_its_guarantee_starts_even_when_others_borrowed(fake: Retrier) -> None:
    _, train, infer, batch = gpu_pools(fake)
    fill(batch, 4)
    fill(train, 4)
    # Claimed together: train is guaranteed 3, batch borrows the rest (infer idle).
    assert by_pool(claim(fake)) == {"batch": 3, "train": 3}
    fill(infer, 2)
    assert claim(fake) == []


def test_changing_the_group_cap_at_runtime(fake: Retrier) -> None:
    gpu, train, _, _ = gpu_pools(fake)
    fill(train, 10)
    assert len(claim(fake)) == 6
    gpu.set_max_parallelism(8)
    assert len(claim(fake)) == 0, "train's own cap (6) holds too"
    train.set_max_parallelism(10)
    assert by_pool(claim(fake)) == {"train": 2}
    assert PoolGroup(fake, "gpu", max_parallelism=5).status().max_parallelism == 5
    status = gpu.status()
    assert status.running == 8 and status.guaranteed == 5
    assert {m.name: (m.guaranteed, m.running) for m in status.members} == {
        "batch": (0, 0), "infer": (2, 0), "train": (3, 8),
    }


def test_guarantees_adding_up_to_more_than_the_cap_are_refused(fake: Retrier) -> None:
    gpu, _, infer, _ = gpu_pools(fake)
    with pytest.raises(InvalidSettings, match="add up to more than group 'gpu'"):
        Workpool(fake, "extra", max_parallelism=5, group=gpu, guaranteed=2)
    assert fake.store.get_queue("extra") is None, "nothing written"
    with pytest.raises(InvalidSettings, match="add up to more than"):
        Workpool(fake, "infer", max_parallelism=6, group=gpu, guaranteed=4)
    assert infer.limits.guaranteed == 2, "the stored guarantee is unchanged"
    with pytest.raises(InvalidSettings, match="guaranteed 5 slot"):
        gpu.set_max_parallelism(4)
    assert fake.store.get_group("gpu").max_parallelism == 6  # type: ignore[union-attr]
    # Moving a pool out of the group frees its guarantee.
    Workpool(fake, "infer", max_parallelism=6)
    gpu.set_max_parallelism(4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"guaranteed": 2}, "needs a group="),
        ({"group": "gpu", "guaranteed": -1}, "0 or more"),
        ({"group": "gpu", "guaranteed": True}, "0 or more"),
        ({"group": "gpu", "guaranteed": 7}, "more than the pool's own"),
        ({"group": "nope"}, "no pool group 'nope'"),
        ({"group": "bad\x00name"}, "NUL"),
    ],
)
def test_bad_group_settings_are_clear_errors(
    fake: Retrier, options: dict[str, object], message: str
) -> None:
    PoolGroup(fake, "gpu", max_parallelism=6)
    with pytest.raises(InvalidSettings, match=message):
        Workpool(fake, "p", max_parallelism=6, **options)  # type: ignore[arg-type]
    assert fake.store.get_queue("p") is None


@pytest.mark.parametrize("cap", [-1, 100_001, 1.5, True])
def test_a_bad_group_cap_is_a_clear_error(fake: Retrier, cap: object) -> None:
    with pytest.raises(InvalidSettings, match="max_parallelism"):
        PoolGroup(fake, "gpu", max_parallelism=cap)  # type: ignore[arg-type]
    assert fake.store.get_group("gpu") is None


def test_explain_says_group_full_and_reserved(fake: Retrier) -> None:
    fake.worker().announce()
    _, train, infer, batch = gpu_pools(fake)
    fill(infer, 2)
    fill(batch, 10)
    taken = claim(fake)
    assert by_pool(taken) == {"batch": 4, "infer": 2}
    waiting = fill(train, 1)[0]
    why = fake.explain(waiting)
    assert why.reason == reasons.GROUP_FULL
    assert why.message.startswith("group full (6 of 6 running)")
    assert why.details["group"] == "gpu"
    finish(fake, [c for c in taken if c.queue == "infer"])
    fill(infer, 1)
    # 2 free slots, reserved: 1 for infer's guarantee, 1 for train's (each has 1 due).
    blocked = fake.store.list_runs(state="pending", queue="batch", limit=1)[0].id
    why = fake.explain(blocked)
    assert why.reason == reasons.GROUP_RESERVED, why.message
    assert why.message.startswith("slots reserved for other pools' guarantees")
    assert why.details["reserved"] == {"infer": 1, "train": 1}
    assert fake.explain(waiting).reason == reasons.CLAIMABLE
    assert by_pool(claim(fake)) == {"infer": 1, "train": 1}


def test_the_cli_shows_groups_and_changes_their_cap(fake: Retrier, db_url: str) -> None:
    _, train, _, _ = gpu_pools(fake)
    fill(train, 2)
    claim(fake)
    runner = CliRunner()
    listed = runner.invoke(cli, ["--db", db_url, "pools", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert '"group": "gpu"' in listed.output and '"guaranteed": 3' in listed.output
    shown = runner.invoke(cli, ["--db", db_url, "pools", "show", "train"])
    assert shown.exit_code == 0, shown.output
    assert "gpu" in shown.output and "2 of 6 running" in shown.output
    changed = runner.invoke(cli, ["--db", db_url, "pools", "set-group-cap", "gpu", "9"])
    assert changed.exit_code == 0, changed.output
    assert fake.store.get_group("gpu").max_parallelism == 9  # type: ignore[union-attr]
    refused = runner.invoke(cli, ["--db", db_url, "pools", "set-group-cap", "gpu", "4"])
    assert refused.exit_code != 0 and "guaranteed 5 slot" in refused.output
    missing = runner.invoke(cli, ["--db", db_url, "pools", "set-group-cap", "nope", "4"])
    assert missing.exit_code != 0 and "no pool group named 'nope'" in missing.output


def test_an_inline_start_takes_the_groups_slots_as_a_claim_does(fake: Retrier) -> None:
    """A workflow step run inline by the worker (`insert_running`) locks the group's
    row and counts its budget like a claim: it borrows idle slots, not reserved ones."""
    _, _, infer, batch = gpu_pools(fake)
    fill(infer, 1)  # reserves 1 of infer's guarantee
    fill(batch, 4)
    assert by_pool(claim(fake)) == {"batch": 4, "infer": 1}
    store = fake.store
    inline = [fake.prepare("work", {}, queue=q) for q in ("batch", "infer", "train")]
    fill(infer, 1)  # due: reserves infer's second guaranteed slot
    with store.dialect.write() as conn:
        assert store.insert_running(inline[0], "w", 5000, conn) is None, "reserved for infer"
    with store.dialect.write() as conn:
        # train runs nothing (below its guarantee of 3): its step is due work too, so
        # the one free slot is reserved for train's guarantee and infer's, 2 for 1.
        assert store.insert_running(inline[2], "w", 5000, conn) is not None
    with store.dialect.write() as conn:
        assert store.insert_running(inline[1], "w", 5000, conn) is None, "group full"
    assert claim(fake) == []
