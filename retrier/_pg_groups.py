"""Pool groups in the PostgreSQL claim: `tiers_group_budget_v1`, the server-side
twin of `_group_budget.load_groups`, which `tiers_claim_v6` calls once per claim.

It locks the rows of the groups the locked queues belong to (after the queues' rows,
as every taker of a member's slots does) and counts, in statements of their own (so
after the lock), each group's free slots, each member's reserve (its unmet guarantee,
at most its due pending runs) and the slots beyond every reserve. The claim then caps
each member's take at `LEAST(free, reserve + borrow)` and counts what it took, its
reserve first, exactly as `QueueBudget.room` and `QueueBudget.started` do.
"""

from __future__ import annotations

GROUP_BUDGET_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tiers_group_budget_v1(
    p_names text[], p_now bigint,
    OUT p_group integer[], OUT p_reserve integer[], OUT p_free integer[],
    OUT p_borrow integer[]
) LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_groups text[] := '{}';
    v_g record;
    v_m record;
    v_gi integer;
    v_i integer;
    v_unmet integer;
    v_due integer;
    v_big constant integer := 1073741824;
BEGIN
    -- Per locked queue (p_names' order): its group's index, its reserve.
    p_group := array_fill(NULL::integer, ARRAY[cardinality(p_names)]);
    p_reserve := array_fill(0, ARRAY[cardinality(p_names)]);
    -- Per group: free slots (the cap less running runs), then the slots beyond every
    -- member's reserve (p_borrow adds up the reserves first).
    p_free := '{}';
    p_borrow := '{}';
    FOR v_g IN
        SELECT g.name, g.max_parallelism FROM tiers_queue_groups g
         WHERE g.name IN (SELECT q.group_name FROM tiers_queues q WHERE q.name = ANY(p_names))
         ORDER BY g.name FOR UPDATE
    LOOP
        v_groups := v_groups || v_g.name::text;
        p_free := p_free || v_g.max_parallelism;
        p_borrow := p_borrow || 0;
    END LOOP;
    FOR v_m IN
        SELECT q.name, q.group_name, COALESCE(q.guaranteed, 0) AS guaranteed,
               q.max_parallelism,
               (SELECT count(*)::integer FROM tiers_runs t
                 WHERE t.state = 'running' AND t.queue = q.name) AS running
          FROM tiers_queues q WHERE q.group_name = ANY(v_groups)
    LOOP
        v_gi := array_position(v_groups, v_m.group_name::text);
        p_free[v_gi] := p_free[v_gi] - v_m.running;
        v_unmet := GREATEST(0, LEAST(v_m.guaranteed, COALESCE(v_m.max_parallelism, v_big))
                               - v_m.running);
        IF v_unmet > 0 THEN
            -- At most its due pending runs: an index range, never the whole backlog.
            SELECT count(*)::integer INTO v_due FROM (
                SELECT 1 FROM tiers_runs t
                 WHERE t.queue = v_m.name AND t.state = 'pending' AND t.due_ms <= p_now
                 LIMIT v_unmet) d;
            v_unmet := LEAST(v_unmet, v_due);
        END IF;
        p_borrow[v_gi] := p_borrow[v_gi] + v_unmet;
        v_i := array_position(p_names, v_m.name::text);
        IF v_i IS NOT NULL THEN
            p_group[v_i] := v_gi;
            p_reserve[v_i] := v_unmet;
        END IF;
    END LOOP;
    FOR v_gi IN 1..cardinality(v_groups) LOOP
        p_borrow[v_gi] := GREATEST(0, p_free[v_gi] - p_borrow[v_gi]);
    END LOOP;
END
$fn$
"""
