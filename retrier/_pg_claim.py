"""The PostgreSQL claim, server-side: one function call instead of four or five
statements, so a worker holds the limited queues' row locks for one round trip.

It does what `Claims.claim_in` does in Python (which SQLite and `explain` use): lock
the limited queues' rows (here only those of queues with claimable runs and of the
other members of their pool groups, so that claims of other queues need not wait for
a busy pool's claims; on SQLite's single writer, locking them all costs nothing);
count, in statements of their own (so in fresh snapshots, after the lock), what their
budget depends on (running runs, the claiming worker's share, starts in a rate window,
running runs per key); then take each open queue's first due runs up to its free
slots, and the due on_complete deliveries, in due order then priority; lease them; and
say when to look again. `tests/test_claims.py` runs the same claim scenarios against
both implementations.

It is `tiers_claim_v6` since it is told whether the caller's clock is the wall
clock (`p_wall_clock`): a claim that waited for another's locks adds the wait to the
time it was given only then, so a fake clock (tests, simulations), which a lock wait
does not move, is never moved by one either; the Python claim reads its clock after
the lock, to the same effect. Before, it was `tiers_claim_v5`, which shares pool
groups' caps among their members (engine_0009, through `tiers_group_budget_v1`:
`_pg_groups`). It takes each queue's
runs in its claim order (priority with aging, keys taking turns: `_claim_order`;
engine_0007) through `tiers_claim_queue_v3`, and each key's run through
`tiers_take_key_v3` (keys' own caps, rate limits per key), and returns each run's
attempt timeout (engine_0008). Each version is a new name, never a replacement: an
older release, still running beside this one in a rolling deploy, keeps calling its
`tiers_claim_v5` (or `tiers_claim_v4`, ... or `tiers_claim`), which stay in place.

It runs with `plan_cache_mode = force_generic_plan` (and so do the functions it
calls). PL/pgSQL plans each statement once per session, but under the default
(`auto`) a statement with parameters is planned again at every call while the
custom plans look cheaper than the generic one, which they do for these statements:
planning then cost more than running them (a claim of 5 with nothing limited, 1.4 ms
of server time against 0.85 ms with generic plans; `tiers_group_budget_v1` alone
122 us against 26 us per call). It also runs without sequential scans (and without
JIT, which would price them at the 1e10 the planner adds to a disabled scan): a
generic plan is made once per session, and one made while `tiers_runs` was small
leased the chosen runs by reading the whole table, at every later claim of that
session (0.58 ms a claim at 5,000 stored runs, growing with them, until an ANALYZE).
Nor with bitmap scans: such a plan, made at a worker's first claim beside an empty
table, took the first due runs by collecting every due one and sorting them, so a
claim of 16 from a backlog of 20,000 cost 5.6 ms of server time (0.64 ms without;
`bench.claim_scaling --backlog`), and a large backlog drained slowest at its start.
Its generic plans are then the index scans the custom ones are, at every table size
and backlog (`bench.claim_scaling`, `bench.fair_claims`). Settings change no result, so they
are set in place, on the current version; so is the skip of `tiers_group_budget_v1`
when no limited queue has claimable runs (nothing reads its answer then; it cost 73
us of a 465 us claim, measured with pg_stat_statements under `bench.ours noop`).
"""

from __future__ import annotations

# A key's cap in a queue: its own (tiers_key_limits), else the queue's default.
KEY_CAP_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tiers_key_cap_v3(p_queue text, p_key text, p_default integer)
RETURNS integer LANGUAGE sql STABLE AS $fn$
    SELECT COALESCE(
        (SELECT k.max_parallelism FROM tiers_key_limits k
          WHERE k.queue = p_queue AND k.key = p_key),
        p_default)
$fn$
"""

# Take one run of a key in a queue that limits its keys (`QueueBudget.take`, per key):
# its cap (own or default), then its rate window (starts logged in tiers_key_starts,
# looked up once per claim, noting when a full window lets the next start). A key
# that cannot take is marked full in p_counts, so the next fetches leave it out.
TAKE_KEY_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tiers_take_key_v3(
    INOUT p_counts jsonb, INOUT p_rates jsonb, INOUT p_retry bigint,
    p_queue text, p_key text, p_default integer, p_over boolean,
    p_rate integer, p_period bigint, p_now bigint, OUT p_ok boolean
) LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_k text := p_queue || E'\x1f' || p_key;
    v_cap integer;
    v_used integer;
    v_n integer;
    v_oldest bigint;
BEGIN
    p_ok := false;
    v_cap := CASE WHEN p_over THEN tiers_key_cap_v3(p_queue, p_key, p_default)
                  ELSE p_default END;
    v_used := COALESCE((p_counts ->> v_k)::integer, 0);
    IF v_cap IS NOT NULL AND v_used >= v_cap THEN
        p_counts := p_counts || jsonb_build_object(v_k, v_used);
        RETURN;
    END IF;
    IF p_rate IS NOT NULL AND p_period > 0 THEN
        IF NOT p_rates ? v_k THEN
            SELECT count(*)::integer, min(x.started_ms) INTO v_n, v_oldest FROM (
                SELECT s.started_ms FROM tiers_key_starts s
                 WHERE s.queue = p_queue AND s.key = p_key
                   AND s.started_ms > p_now - p_period
                 ORDER BY s.started_ms DESC LIMIT p_rate) x;
            -- [starts in the window, the oldest of them]
            p_rates := p_rates || jsonb_build_object(v_k, jsonb_build_array(v_n, v_oldest));
            IF v_n >= p_rate THEN
                p_retry := LEAST(COALESCE(p_retry, v_oldest + p_period), v_oldest + p_period);
            END IF;
        END IF;
        v_n := (p_rates -> v_k ->> 0)::integer;
        IF v_n >= p_rate THEN
            p_counts := p_counts
                || jsonb_build_object(v_k, GREATEST(v_used, COALESCE(v_cap, 1073741824)));
            RETURN;
        END IF;
        p_rates := p_rates
            || jsonb_build_object(v_k, jsonb_build_array(v_n + 1, p_rates -> v_k -> 1));
        IF v_n + 1 >= p_rate THEN
            -- This start fills the window: look again no later than it reopens.
            v_oldest := COALESCE((p_rates -> v_k ->> 1)::bigint, p_now) + p_period;
            p_retry := LEAST(COALESCE(p_retry, v_oldest), v_oldest);
        END IF;
    END IF;
    p_counts := p_counts || jsonb_build_object(v_k, v_used + 1);
    p_ok := true;
END
$fn$
"""

# One queue's due pending runs in claim order (see `_claim_order.QueueOrder.fetch`):
# with an aging threshold, the aged runs by due time, then one priority level at a
# time (highest first, found by a loose scan) by due time; without, by due time.
QUEUE_ORDER_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tiers_claim_queue_v3(
    p_queue text, p_aging bigint, p_n integer, p_now bigint,
    p_any_fn boolean, p_fns text[], p_full text[], p_exclude text[]
) RETURNS TABLE (id varchar, due_ms bigint, priority integer, key varchar)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    v_left integer := p_n;
    v_level integer;
    v_below integer;
    v_found integer;
BEGIN
    IF p_n <= 0 THEN
        RETURN;
    END IF;
    IF COALESCE(p_aging, 0) <= 0 THEN
        RETURN QUERY SELECT t.id, t.due_ms, t.priority, t.key FROM tiers_runs t
         WHERE t.queue = p_queue AND t.state = 'pending' AND t.due_ms <= p_now
           AND (p_any_fn OR t.fn = ANY(p_fns))
           AND (t.key IS NULL OR NOT t.key = ANY(p_full))
           AND NOT t.id = ANY(p_exclude)
         ORDER BY t.due_ms, t.priority DESC LIMIT p_n
         FOR UPDATE SKIP LOCKED;
        RETURN;
    END IF;
    RETURN QUERY SELECT t.id, t.due_ms, t.priority, t.key FROM tiers_runs t
     WHERE t.queue = p_queue AND t.state = 'pending' AND t.due_ms <= p_now - p_aging
       AND (p_any_fn OR t.fn = ANY(p_fns))
       AND (t.key IS NULL OR NOT t.key = ANY(p_full))
       AND NOT t.id = ANY(p_exclude)
     ORDER BY t.due_ms, t.priority DESC LIMIT p_n
     FOR UPDATE SKIP LOCKED;
    GET DIAGNOSTICS v_found = ROW_COUNT;
    v_left := p_n - v_found;
    WHILE v_left > 0 LOOP
        v_level := NULL;  -- the next level down: a seek on ix_tiers_runs_queue_priority
        IF v_below IS NULL THEN
            SELECT t.priority INTO v_level FROM tiers_runs t
             WHERE t.queue = p_queue AND t.state = 'pending'
             ORDER BY t.priority DESC, t.due_ms LIMIT 1;
        ELSE
            SELECT t.priority INTO v_level FROM tiers_runs t
             WHERE t.queue = p_queue AND t.state = 'pending' AND t.priority < v_below
             ORDER BY t.priority DESC, t.due_ms LIMIT 1;
        END IF;
        EXIT WHEN v_level IS NULL;
        RETURN QUERY SELECT t.id, t.due_ms, t.priority, t.key FROM tiers_runs t
         WHERE t.queue = p_queue AND t.state = 'pending' AND t.priority = v_level
           AND t.due_ms > p_now - p_aging AND t.due_ms <= p_now
           AND (p_any_fn OR t.fn = ANY(p_fns))
           AND (t.key IS NULL OR NOT t.key = ANY(p_full))
           AND NOT t.id = ANY(p_exclude)
         ORDER BY t.due_ms LIMIT v_left
         FOR UPDATE SKIP LOCKED;
        GET DIAGNOSTICS v_found = ROW_COUNT;
        v_left := v_left - v_found;
        v_below := v_level;
    END LOOP;
END
$fn$
"""


CLAIM_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tiers_claim_v6(
    p_worker text, p_limit integer, p_lease_ms bigint, p_now bigint,
    p_any_fn boolean, p_fns text[], p_handlers text[], p_wall_clock boolean
) RETURNS TABLE (
    kind text, id varchar, fn varchar, args json, state varchar, fence integer,
    attempts integer, failures integer, queue varchar, owner varchar,
    on_complete varchar, context json, outcome varchar, result json, error varchar,
    wake_ms bigint, trace varchar, due_ms bigint, timeout_ms bigint
) LANGUAGE plpgsql VOLATILE
  SET plan_cache_mode = force_generic_plan SET enable_seqscan = off
  SET enable_bitmapscan = off SET jit = off AS $fn$
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
    v_ords integer[] := '{}';
    v_poss integer[] := '{}';
    v_aging bigint[] := '{}';
    v_ord integer := 0;
    v_pos integer;
    v_latest bigint;
    v_rr boolean[] := '{}';
    v_over boolean[] := '{}';
    v_krate integer[] := '{}';
    v_kperiod bigint[] := '{}';
    v_krates jsonb := '{}';
    v_ok boolean;
    v_cursor text;
    v_at text;
    v_group text;
    v_seen text[];
    v_dry text[];
    v_visits integer;
    v_key_counts jsonb := '{}';
    v_full text[];
    v_used integer;
    v_chosen text[];
    v_next bigint;
    v_big constant integer := 1073741824;
    v_locked text[] := '{}';
    v_limited text[];
    v_busy text[] := '{}';
    v_qgroup integer[];
    v_greserve integer[];
    v_gfree integer[];
    v_gborrow integer[];
    v_gi integer;
    v_own integer;
BEGIN
    -- 1. The limited queues; and, locked, the rows of those with claimable runs and
    --    of the other members of their pool groups: claims (and inline starts) of one
    --    queue take its slots one after the other, while claims that find nothing in
    --    it do not wait for them.
    SELECT COALESCE(array_agg(q.name), '{}') INTO v_limited FROM tiers_queues q
     WHERE q.max_parallelism IS NOT NULL OR q.rate_limit IS NOT NULL
        OR q.max_per_key IS NOT NULL OR q.max_per_worker IS NOT NULL
        OR q.priority_aging_ms IS NOT NULL OR q.round_robin IS NOT NULL
        OR q.key_rate_limit IS NOT NULL OR q.group_name IS NOT NULL
        OR q.guaranteed IS NOT NULL;
    IF cardinality(v_limited) > 0 THEN
        SELECT COALESCE(array_agg(q.name), '{}') INTO v_busy FROM tiers_queues q
         WHERE q.name = ANY(v_limited) AND (
               -- (a scalar subquery, written as ORDER BY ... LIMIT 1 on
               -- ix_tiers_runs_queue_due's columns, so the plan is one seek per queue
               -- whatever the table's statistics say: an EXISTS became a semi join)
               SELECT t.due_ms FROM tiers_runs t
                WHERE t.queue = q.name AND t.state IN ('pending', 'finishing')
                ORDER BY t.queue, t.due_ms LIMIT 1) IS NOT NULL;
        SELECT COALESCE(array_agg(l.name), '{}') INTO v_locked FROM (
            SELECT q.name FROM tiers_queues q
             WHERE q.name = ANY(v_busy) OR q.group_name IN (
                   SELECT b.group_name FROM tiers_queues b WHERE b.name = ANY(v_busy))
             ORDER BY q.name FOR UPDATE) l;
        -- A claim that waited for another's locks must not stamp its runs as started
        -- before that claim committed: add the time since this call began (if it was
        -- a wait) to the caller's clock, when that is the wall clock. (A session's first
        -- call also counts its planning here: a fake clock must not move by that, or by
        -- any real time.)
        IF p_wall_clock THEN
            v_waited := ceil(extract(epoch FROM clock_timestamp() - statement_timestamp())
                             * 1000);
            IF v_waited >= 5 THEN
                v_now := v_now + v_waited;
            END IF;
        END IF;
    END IF;

    -- 2. Each limited queue's free slots, counted after the lock.
    FOR v_q IN
        SELECT q.name, q.max_per_key, q.rate_limit, q.rate_period_ms, q.priority_aging_ms,
               COALESCE(q.round_robin, false) AS round_robin,
               q.key_rate_limit, q.key_rate_period_ms,
               EXISTS (SELECT 1 FROM tiers_key_limits k WHERE k.queue = q.name) AS overridden,
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
        v_aging := v_aging || v_q.priority_aging_ms;
        v_rr := v_rr || v_q.round_robin;
        v_over := v_over || v_q.overridden;
        v_krate := v_krate || v_q.key_rate_limit;
        v_kperiod := v_kperiod || v_q.key_rate_period_ms;
    END LOOP;
    IF array_length(v_names, 1) IS NOT NULL THEN
        SELECT COALESCE(jsonb_object_agg(t.queue || E'\x1f' || t.key, t.n), '{}')
          INTO v_key_counts
          FROM (SELECT t.queue, t.key, count(*) AS n FROM tiers_runs t
                 WHERE t.state = 'running' AND t.key IS NOT NULL
                   AND t.queue = ANY(v_names) GROUP BY t.queue, t.key) t;
    END IF;
    -- 2'. Pool groups, counted once (`_pg_groups`): each member's group and reserve,
    --     each group's free slots and the slots beyond every reserve. (None without a
    --     limited queue, and then step 4, which reads them, does not run.)
    IF array_length(v_names, 1) IS NOT NULL THEN
        SELECT * INTO v_qgroup, v_greserve, v_gfree, v_gborrow
          FROM tiers_group_budget_v1(v_names, v_now);
    END IF;

    -- 3. With no limited queue, the first due runs and deliveries, in one fetch.
    IF array_length(v_names, 1) IS NULL THEN
        SELECT COALESCE(array_agg(c.id), '{}') INTO v_chosen FROM (
            SELECT t.id FROM tiers_runs t
             WHERE t.state IN ('pending', 'finishing') AND t.due_ms <= v_now
               AND (p_any_fn OR (t.state = 'pending' AND t.fn = ANY(p_fns))
                    OR (t.state = 'finishing' AND t.on_complete = ANY(p_handlers)))
               -- (not a limited queue's runs, which came after step 1 looked)
               AND (t.state = 'finishing' OR NOT t.queue = ANY(v_limited))
             ORDER BY t.due_ms, t.priority DESC LIMIT p_limit
             FOR UPDATE SKIP LOCKED) c;
    ELSE
    -- 3'. Due on_complete deliveries, which no queue limit holds back (merge
    --     ordinal 0; see `_claim_order.merge_key_rows` for the merge).
    v_pos := 0;
    FOR v_r IN
        SELECT t.id, t.due_ms FROM tiers_runs t
         WHERE t.state = 'finishing' AND t.due_ms <= v_now
           AND (p_any_fn OR t.on_complete = ANY(p_handlers))
         ORDER BY t.due_ms LIMIT p_limit
         FOR UPDATE SKIP LOCKED
    LOOP
        v_ids := v_ids || v_r.id::text;
        v_dues := v_dues || v_r.due_ms;
        v_ords := v_ords || 0;
        v_poss := v_poss || v_pos;
        v_pos := v_pos + 1;
    END LOOP;

    -- 4. Each queue with claimable runs (a loose index scan), in its claim order, up
    --    to its free slots; merge keys: (latest due so far, the queue's ordinal, position).
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
        v_ord := v_ord + 1;
        v_pos := 0;
        v_latest := NULL;
        v_i := array_position(v_names, v_q.name::text);
        -- A limited queue whose runs came after step 1 looked: the next claim's.
        CONTINUE WHEN v_i IS NULL AND v_q.name = ANY(v_limited);
        v_want := CASE WHEN v_i IS NULL THEN p_limit ELSE LEAST(v_slots[v_i], p_limit) END;
        v_gi := CASE WHEN v_i IS NULL THEN NULL ELSE v_qgroup[v_i] END;
        IF v_gi IS NOT NULL THEN
            -- Its group's room: its reserve left, then the borrowable slots.
            v_want := LEAST(v_want, GREATEST(0, LEAST(v_gfree[v_gi],
                                                      v_greserve[v_i] + v_gborrow[v_gi])));
        END IF;
        CONTINUE WHEN v_want <= 0;
        IF v_i IS NOT NULL AND v_rr[v_i] THEN
            -- Keys take turns (see `_claim_order.KeyTurns`): round the ring of keys
            -- (no key first, then the keys in order) from the stored cursor, one run
            -- per key per turn, until a lap finds nothing or the visits run out.
            SELECT q.rr_cursor INTO v_cursor FROM tiers_queues q WHERE q.name = v_q.name;
            v_at := v_cursor;
            v_seen := '{}';
            v_dry := '{}';
            v_visits := 0;
            WHILE v_want > 0 AND v_visits < v_want * 2 + 8 LOOP
                v_group := NULL;
                -- Written as ORDER BY ... LIMIT 1 on ix_tiers_runs_queue_key_due's
                -- columns, so the plan is a seek whatever the table's statistics say.
                IF v_at IS NULL AND EXISTS (
                    SELECT 1 FROM tiers_runs t WHERE t.queue = v_q.name
                       AND t.state = 'pending' AND t.key IS NULL
                     ORDER BY t.key, t.due_ms LIMIT 1) THEN
                    v_group := '';
                ELSE
                    SELECT t.key INTO v_group FROM tiers_runs t
                     WHERE t.queue = v_q.name AND t.state = 'pending'
                       AND t.key > COALESCE(v_at, '')
                     ORDER BY t.key, t.due_ms LIMIT 1;
                END IF;
                IF v_group IS NULL THEN
                    EXIT WHEN v_at IS NULL;
                    v_at := NULL;
                    CONTINUE;
                END IF;
                v_at := v_group;
                EXIT WHEN v_group = ANY(v_seen)
                    AND cardinality(v_seen) = cardinality(v_dry);
                IF NOT v_group = ANY(v_seen) THEN
                    v_seen := v_seen || v_group;
                END IF;
                CONTINUE WHEN v_group = ANY(v_dry);
                v_visits := v_visits + 1;
                IF v_group = '' THEN
                    SELECT t.id, t.due_ms, t.key INTO v_r FROM tiers_runs t
                     WHERE t.queue = v_q.name AND t.state = 'pending' AND t.key IS NULL
                       AND t.due_ms <= v_now AND (p_any_fn OR t.fn = ANY(p_fns))
                       AND NOT t.id = ANY(v_ids)
                     ORDER BY t.due_ms, t.priority DESC LIMIT 1
                     FOR UPDATE SKIP LOCKED;
                ELSE
                    SELECT t.id, t.due_ms, t.key INTO v_r FROM tiers_runs t
                     WHERE t.queue = v_q.name AND t.state = 'pending' AND t.key = v_group
                       AND t.due_ms <= v_now AND (p_any_fn OR t.fn = ANY(p_fns))
                       AND NOT t.id = ANY(v_ids)
                     ORDER BY t.due_ms, t.priority DESC LIMIT 1
                     FOR UPDATE SKIP LOCKED;
                END IF;
                IF NOT FOUND THEN
                    v_dry := v_dry || v_group;
                    CONTINUE;
                END IF;
                IF v_r.key IS NOT NULL AND (v_per_key[v_i] IS NOT NULL OR v_over[v_i]
                                           OR v_krate[v_i] IS NOT NULL) THEN
                    SELECT * INTO v_key_counts, v_krates, v_rate_retry, v_ok
                      FROM tiers_take_key_v3(
                        v_key_counts, v_krates, v_rate_retry, v_q.name, v_r.key, v_per_key[v_i],
                        v_over[v_i], v_krate[v_i], v_kperiod[v_i], v_now);
                    IF NOT v_ok THEN
                        v_dry := v_dry || v_group;
                        CONTINUE;
                    END IF;
                END IF;
                v_latest := GREATEST(COALESCE(v_latest, v_r.due_ms), v_r.due_ms);
                v_ids := v_ids || v_r.id::text;
                v_dues := v_dues || v_latest;
                v_ords := v_ords || v_ord;
                v_poss := v_poss || v_pos;
                v_pos := v_pos + 1;
                v_want := v_want - 1;
            END LOOP;
            IF v_at IS DISTINCT FROM v_cursor THEN
                UPDATE tiers_queues SET rr_cursor = v_at WHERE name = v_q.name;
            END IF;
            IF v_want > 0 AND v_visits >= v_want * 2 + 8 THEN
                -- Visits ran out: fill the remaining slots in due order.
                SELECT COALESCE(array_agg(substr(k, length(v_q.name) + 2)), '{}')
                  INTO v_full
                  FROM jsonb_each_text(v_key_counts) e(k, v)
                 WHERE left(k, length(v_q.name) + 1) = v_q.name || E'\x1f'
                   AND v::integer >= COALESCE(CASE WHEN v_over[v_i]
                       THEN tiers_key_cap_v3(v_q.name, substr(k, length(v_q.name) + 2),
                                             v_per_key[v_i])
                       ELSE v_per_key[v_i] END, v_big);
                FOR v_r IN
                    SELECT * FROM tiers_claim_queue_v3(
                        v_q.name, NULL, v_want, v_now, p_any_fn, p_fns, v_full, v_ids)
                LOOP
                    IF v_r.key IS NOT NULL AND (v_per_key[v_i] IS NOT NULL OR v_over[v_i]
                                               OR v_krate[v_i] IS NOT NULL) THEN
                        SELECT * INTO v_key_counts, v_krates, v_rate_retry, v_ok
                          FROM tiers_take_key_v3(
                            v_key_counts, v_krates, v_rate_retry, v_q.name, v_r.key, v_per_key[v_i],
                            v_over[v_i], v_krate[v_i], v_kperiod[v_i], v_now);
                        IF NOT v_ok THEN
                            CONTINUE;
                        END IF;
                    END IF;
                    v_latest := GREATEST(COALESCE(v_latest, v_r.due_ms), v_r.due_ms);
                    v_ids := v_ids || v_r.id::text;
                    v_dues := v_dues || v_latest;
                    v_ords := v_ords || v_ord;
                    v_poss := v_poss || v_pos;
                    v_pos := v_pos + 1;
                END LOOP;
            END IF;
        ELSIF v_i IS NULL
           OR (v_per_key[v_i] IS NULL AND NOT v_over[v_i] AND v_krate[v_i] IS NULL) THEN
            FOR v_r IN
                SELECT * FROM tiers_claim_queue_v3(
                    v_q.name, CASE WHEN v_i IS NULL THEN NULL ELSE v_aging[v_i] END,
                    v_want, v_now, p_any_fn, p_fns, '{}', '{}')
            LOOP
                v_latest := GREATEST(COALESCE(v_latest, v_r.due_ms), v_r.due_ms);
                v_ids := v_ids || v_r.id::text;
                v_dues := v_dues || v_latest;
                v_ords := v_ords || v_ord;
                v_poss := v_poss || v_pos;
                v_pos := v_pos + 1;
            END LOOP;
        ELSE
            -- A key at its limit takes nothing more: leave its runs out of the fetch,
            -- and fetch again (a few rounds) while keys fill up and slots remain.
            FOR v_round IN 1..4 LOOP
                SELECT COALESCE(array_agg(substr(k, length(v_q.name) + 2)), '{}')
                  INTO v_full
                  FROM jsonb_each_text(v_key_counts) e(k, v)
                 WHERE left(k, length(v_q.name) + 1) = v_q.name || E'\x1f'
                   AND v::integer >= COALESCE(CASE WHEN v_over[v_i]
                       THEN tiers_key_cap_v3(v_q.name, substr(k, length(v_q.name) + 2),
                                             v_per_key[v_i])
                       ELSE v_per_key[v_i] END, v_big);
                v_found := 0;
                FOR v_r IN
                    SELECT * FROM tiers_claim_queue_v3(
                        v_q.name, v_aging[v_i], v_want * 2 + 8, v_now, p_any_fn, p_fns,
                        v_full, v_ids)
                LOOP
                    v_found := v_found + 1;
                    EXIT WHEN v_want <= 0;
                    IF v_r.key IS NOT NULL AND (v_per_key[v_i] IS NOT NULL OR v_over[v_i]
                                               OR v_krate[v_i] IS NOT NULL) THEN
                        SELECT * INTO v_key_counts, v_krates, v_rate_retry, v_ok
                          FROM tiers_take_key_v3(
                            v_key_counts, v_krates, v_rate_retry, v_q.name, v_r.key, v_per_key[v_i],
                            v_over[v_i], v_krate[v_i], v_kperiod[v_i], v_now);
                        IF NOT v_ok THEN
                            CONTINUE;
                        END IF;
                    END IF;
                    v_latest := GREATEST(COALESCE(v_latest, v_r.due_ms), v_r.due_ms);
                    v_ids := v_ids || v_r.id::text;
                    v_dues := v_dues || v_latest;
                    v_ords := v_ords || v_ord;
                    v_poss := v_poss || v_pos;
                    v_pos := v_pos + 1;
                    v_want := v_want - 1;
                END LOOP;
                EXIT WHEN v_want <= 0 OR v_found < (v_want * 2 + 8);
            END LOOP;
        END IF;
        IF v_gi IS NOT NULL AND v_pos > 0 THEN
            -- What it took, counted against its group: its reserve first.
            v_own := LEAST(v_pos, v_greserve[v_i]);
            v_greserve[v_i] := v_greserve[v_i] - v_own;
            v_gborrow[v_gi] := v_gborrow[v_gi] - (v_pos - v_own);
            v_gfree[v_gi] := v_gfree[v_gi] - v_pos;
        END IF;
    END LOOP;

    -- 5. The first p_limit of them in merge order: leased.
    SELECT COALESCE(array_agg(c.id ORDER BY c.due, c.ord, c.pos), '{}') INTO v_chosen
      FROM (SELECT u.id, u.due, u.ord, u.pos
              FROM unnest(v_ids, v_dues, v_ords, v_poss) AS u(id, due, ord, pos)
             ORDER BY u.due, u.ord, u.pos LIMIT p_limit) c;
    -- 5'. Starts of keys with a rate limit per key, logged for their windows (and
    --     their starts out of the window deleted).
    IF EXISTS (SELECT 1 FROM unnest(v_krate) AS r(n) WHERE r.n IS NOT NULL) THEN
        INSERT INTO tiers_key_starts (queue, key, started_ms)
        SELECT t.queue, t.key, v_now FROM tiers_runs t
         WHERE t.id = ANY(v_chosen) AND t.state = 'pending' AND t.key IS NOT NULL
           AND v_krate[array_position(v_names, t.queue::text)] IS NOT NULL
         ORDER BY t.queue, t.key;
        DELETE FROM tiers_key_starts s USING (
            SELECT DISTINCT t.queue, t.key,
                   v_kperiod[array_position(v_names, t.queue::text)] AS period
              FROM tiers_runs t
             WHERE t.id = ANY(v_chosen) AND t.state = 'pending' AND t.key IS NOT NULL
               AND v_krate[array_position(v_names, t.queue::text)] IS NOT NULL) c
         WHERE s.queue = c.queue AND s.key = c.key AND s.started_ms <= v_now - c.period;
    END IF;
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
      FROM leased l ORDER BY array_position(v_chosen, l.id::text);

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
