"""The PostgreSQL claim, server-side: one function call instead of four or five
statements, so a worker holds the limited queues' row locks for one round trip.

It does what `Claims.claim_in` does in Python (which SQLite and `explain` use): lock
the limited queues' rows; count, in statements of their own (so in fresh snapshots,
after the lock), what their budget depends on (running runs, the claiming worker's
share, starts in a rate window, running runs per key); then take each open queue's
first due runs up to its free slots, and the due on_complete deliveries, in due order
then priority; lease them; and say when to look again. `tests/test_claims.py` runs the
same claim scenarios against both implementations.

It is `tiers_claim_v3` since it also returns each run's trace context and due time
(engine_0003, v2) and its attempt timeout (engine_0005, v3): a function's result
columns cannot change in place, and an older release, still running beside this one
in a rolling deploy, keeps its own version.
"""

from __future__ import annotations

CLAIM_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tiers_claim_v3(
    p_worker text, p_limit integer, p_lease_ms bigint, p_now bigint,
    p_any_fn boolean, p_fns text[], p_handlers text[]
) RETURNS TABLE (
    kind text, id varchar, fn varchar, args json, state varchar, fence integer,
    attempts integer, failures integer, queue varchar, owner varchar,
    on_complete varchar, context json, outcome varchar, result json, error varchar,
    wake_ms bigint, trace varchar, due_ms bigint, timeout_ms bigint
) LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    v_now bigint := p_now;
    v_waited bigint;
    v_q record;
    v_r record;
    v_names text[] := '{}';
    v_slots integer[] := '{}';
    v_per_key integer[] := '{}';
    v_rate_retry bigint;
    v_i integer;
    v_left integer;
    v_want integer;
    v_round integer;
    v_found integer;
    v_ids text[] := '{}';
    v_dues bigint[] := '{}';
    v_prios integer[] := '{}';
    v_key_counts jsonb := '{}';
    v_full text[];
    v_used integer;
    v_chosen text[];
    v_next bigint;
    v_big constant integer := 1073741824;
    v_locked text[];
    v_t timestamptz;
BEGIN
    -- 1. The limited queues' rows, locked: claims (and inline starts) of one queue
    --    take its slots one after the other.
    v_t := clock_timestamp();
    SELECT COALESCE(array_agg(l.name), '{}') INTO v_locked FROM (
        SELECT q.name FROM tiers_queues q
         WHERE q.max_parallelism IS NOT NULL OR q.rate_limit IS NOT NULL
            OR q.max_per_key IS NOT NULL OR q.max_per_worker IS NOT NULL
         ORDER BY q.name FOR UPDATE) l;
    -- A claim that waited for another's locks must not stamp its runs as started
    -- before that claim committed: add the wait (if it was one) to the caller's clock.
    v_waited := floor(extract(epoch FROM clock_timestamp() - v_t) * 1000);
    IF v_waited >= 5 THEN
        v_now := v_now + v_waited;
    END IF;

    -- 2. Each limited queue's free slots, counted after the lock.
    FOR v_q IN
        SELECT q.name, q.max_per_key, q.rate_limit, q.rate_period_ms,
               LEAST(
                   COALESCE(q.max_parallelism - r.n, v_big),
                   COALESCE(q.max_per_worker - r.mine, v_big)
               ) AS slots
          FROM tiers_queues q
          CROSS JOIN LATERAL (
              SELECT count(*)::integer AS n,
                     count(*) FILTER (WHERE t.lease_owner = p_worker)::integer AS mine
                FROM tiers_runs t WHERE t.state = 'running' AND t.queue = q.name
          ) r
         WHERE q.name = ANY(v_locked)
         ORDER BY q.name
    LOOP
        v_left := v_q.slots;
        IF v_q.rate_limit IS NOT NULL AND v_q.rate_period_ms > 0 THEN
            -- Starts in the window (now - period, now]: finished attempts and running.
            SELECT count(*)::integer INTO v_used FROM (
                SELECT a.started_ms FROM tiers_attempts a
                 WHERE a.queue = v_q.name AND a.started_ms > v_now - v_q.rate_period_ms
                   AND a.outcome <> 'released'
                UNION ALL
                SELECT t.started_ms FROM tiers_runs t
                 WHERE t.queue = v_q.name AND t.state = 'running'
                   AND t.started_ms > v_now - v_q.rate_period_ms
            ) s;
            IF v_q.rate_limit - v_used <= 0 THEN
                -- One more may start once the limit-th newest start leaves the window.
                SELECT s.started_ms + v_q.rate_period_ms INTO v_next FROM (
                    SELECT a.started_ms FROM tiers_attempts a
                     WHERE a.queue = v_q.name AND a.started_ms > v_now - v_q.rate_period_ms
                       AND a.outcome <> 'released'
                    UNION ALL
                    SELECT t.started_ms FROM tiers_runs t
                     WHERE t.queue = v_q.name AND t.state = 'running'
                       AND t.started_ms > v_now - v_q.rate_period_ms
                ) s ORDER BY s.started_ms DESC OFFSET v_q.rate_limit - 1 LIMIT 1;
                v_rate_retry := LEAST(COALESCE(v_rate_retry, v_next), v_next);
            END IF;
            v_left := LEAST(v_left, v_q.rate_limit - v_used);
        END IF;
        v_names := v_names || v_q.name::text;
        v_slots := v_slots || v_left;
        v_per_key := v_per_key || v_q.max_per_key;
    END LOOP;
    IF array_length(v_names, 1) IS NOT NULL THEN
        SELECT COALESCE(jsonb_object_agg(t.queue || E'\x1f' || t.key, t.n), '{}')
          INTO v_key_counts
          FROM (SELECT t.queue, t.key, count(*) AS n FROM tiers_runs t
                 WHERE t.state = 'running' AND t.key IS NOT NULL
                   AND t.queue = ANY(v_names) GROUP BY t.queue, t.key) t;
    END IF;

    -- 3. With no limited queue, the first due runs and deliveries, in one fetch.
    IF array_length(v_names, 1) IS NULL THEN
        SELECT COALESCE(array_agg(c.id), '{}') INTO v_chosen FROM (
            SELECT t.id FROM tiers_runs t
             WHERE t.state IN ('pending', 'finishing') AND t.due_ms <= v_now
               AND (p_any_fn OR (t.state = 'pending' AND t.fn = ANY(p_fns))
                    OR (t.state = 'finishing' AND t.on_complete = ANY(p_handlers)))
             ORDER BY t.due_ms, t.priority DESC LIMIT p_limit
             FOR UPDATE SKIP LOCKED) c;
    ELSE
    -- 3'. Each queue with claimable runs (a loose index scan), up to its free slots.
    FOR v_q IN
        WITH RECURSIVE qs(name) AS (
            SELECT (SELECT min(t.queue) FROM tiers_runs t
                     WHERE t.state IN ('pending', 'finishing'))
            UNION ALL
            SELECT (SELECT min(t.queue) FROM tiers_runs t
                     WHERE t.state IN ('pending', 'finishing') AND t.queue > qs.name)
              FROM qs WHERE qs.name IS NOT NULL
        ) SELECT qs.name FROM qs WHERE qs.name IS NOT NULL
    LOOP
        v_i := array_position(v_names, v_q.name::text);
        v_want := CASE WHEN v_i IS NULL THEN p_limit ELSE LEAST(v_slots[v_i], p_limit) END;
        CONTINUE WHEN v_want <= 0;
        IF v_i IS NULL OR v_per_key[v_i] IS NULL THEN
            FOR v_r IN
                SELECT t.id, t.due_ms, t.priority FROM tiers_runs t
                 WHERE t.queue = v_q.name AND t.state = 'pending' AND t.due_ms <= v_now
                   AND (p_any_fn OR t.fn = ANY(p_fns))
                 ORDER BY t.due_ms, t.priority DESC LIMIT v_want
                 FOR UPDATE SKIP LOCKED
            LOOP
                v_ids := v_ids || v_r.id::text;
                v_dues := v_dues || v_r.due_ms;
                v_prios := v_prios || v_r.priority;
            END LOOP;
        ELSE
            -- A key at its limit takes nothing more: leave its runs out of the fetch,
            -- and fetch again (a few rounds) while keys fill up and slots remain.
            FOR v_round IN 1..4 LOOP
                SELECT COALESCE(array_agg(substr(k, length(v_q.name) + 2)), '{}')
                  INTO v_full
                  FROM jsonb_each_text(v_key_counts) e(k, v)
                 WHERE left(k, length(v_q.name) + 1) = v_q.name || E'\x1f'
                   AND v::integer >= v_per_key[v_i];
                v_found := 0;
                FOR v_r IN
                    SELECT t.id, t.due_ms, t.priority, t.key FROM tiers_runs t
                     WHERE t.queue = v_q.name AND t.state = 'pending' AND t.due_ms <= v_now
                       AND (p_any_fn OR t.fn = ANY(p_fns))
                       AND (t.key IS NULL OR NOT t.key = ANY(v_full))
                       AND NOT t.id = ANY(v_ids)
                     ORDER BY t.due_ms, t.priority DESC LIMIT v_want * 2 + 8
                     FOR UPDATE SKIP LOCKED
                LOOP
                    v_found := v_found + 1;
                    EXIT WHEN v_want <= 0;
                    IF v_r.key IS NOT NULL THEN
                        v_used := COALESCE(
                            (v_key_counts ->> (v_q.name || E'\x1f' || v_r.key))::integer, 0);
                        CONTINUE WHEN v_used >= v_per_key[v_i];
                        v_key_counts := v_key_counts
                            || jsonb_build_object(v_q.name || E'\x1f' || v_r.key, v_used + 1);
                    END IF;
                    v_ids := v_ids || v_r.id::text;
                    v_dues := v_dues || v_r.due_ms;
                    v_prios := v_prios || v_r.priority;
                    v_want := v_want - 1;
                END LOOP;
                EXIT WHEN v_want <= 0 OR v_found < (v_want * 2 + 8);
            END LOOP;
        END IF;
    END LOOP;

    -- 4. Due on_complete deliveries, which no queue limit holds back.
    FOR v_r IN
        SELECT t.id, t.due_ms, t.priority FROM tiers_runs t
         WHERE t.state = 'finishing' AND t.due_ms <= v_now
           AND (p_any_fn OR t.on_complete = ANY(p_handlers))
         ORDER BY t.due_ms LIMIT p_limit
         FOR UPDATE SKIP LOCKED
    LOOP
        v_ids := v_ids || v_r.id::text;
        v_dues := v_dues || v_r.due_ms;
        v_prios := v_prios || v_r.priority;
    END LOOP;

    -- 5. The first p_limit of them in due order, then priority: leased.
    SELECT COALESCE(array_agg(c.id ORDER BY c.due, c.prio DESC), '{}') INTO v_chosen
      FROM (SELECT u.id, u.due, u.prio FROM unnest(v_ids, v_dues, v_prios) AS u(id, due, prio)
             ORDER BY u.due, u.prio DESC LIMIT p_limit) c;
    END IF;
    RETURN QUERY WITH leased AS (
        UPDATE tiers_runs t SET
            state = CASE WHEN t.state = 'pending' THEN 'running' ELSE 'delivering' END,
            fence = t.fence + 1,
            attempts = t.attempts + CASE WHEN t.state = 'pending' THEN 1 ELSE 0 END,
            lease_owner = p_worker,
            lease_until_ms = v_now + p_lease_ms,
            started_ms = CASE WHEN t.state = 'pending' THEN v_now ELSE t.started_ms END
         WHERE t.id = ANY(v_chosen)
        RETURNING t.*
    )
    SELECT 'run'::text, l.id, l.fn, l.args, l.state, l.fence, l.attempts, l.failures,
           l.queue, l.owner, l.on_complete, l.context, l.outcome, l.result, l.error, v_now,
           l.trace, l.due_ms, l.timeout_ms
      FROM leased l ORDER BY l.due_ms, l.priority DESC;

    -- 6. When to look again: the next due run, or when a rate window reopens.
    IF coalesce(array_length(v_chosen, 1), 0) < p_limit THEN
        SELECT min(t.due_ms) INTO v_next FROM tiers_runs t
         WHERE t.state IN ('pending', 'finishing') AND t.due_ms > v_now
           AND (p_any_fn OR (t.state = 'pending' AND t.fn = ANY(p_fns))
                OR (t.state = 'finishing' AND t.on_complete = ANY(p_handlers)));
        v_rate_retry := LEAST(COALESCE(v_rate_retry, v_next), v_next);
    END IF;
    RETURN QUERY SELECT 'wake'::text, NULL::varchar, NULL::varchar, NULL::json,
        NULL::varchar, NULL::integer, NULL::integer, NULL::integer, NULL::varchar,
        NULL::varchar, NULL::varchar, NULL::json, NULL::varchar, NULL::json,
        NULL::varchar, v_rate_retry, NULL::varchar, NULL::bigint, NULL::bigint;
END
$fn$
"""
