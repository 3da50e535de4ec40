//! The commit path: one compare-and-swap write of a task's record with its history and
//! runs, alone or as a group in one transaction.

use std::collections::{HashMap, HashSet};

use sqlx::PgConnection;

use super::PgStore;
use super::rows::{TASK_COLUMNS, TaskRow, task_exists};
use super::runs::{attempt, end_runs, insert_run};
use crate::domain::FailureKind;
use crate::error::{Error, Result};
use crate::store::plan::{self, Step};
use crate::store::{Committed, TaskWrite};
use pipeline_core::ids::{CommitId, TreeId};

/// What the compare-and-swap statement returns: the task as written, its history entry's
/// position and, when the statement started the write's run too, the run's ID.
#[derive(sqlx::FromRow)]
struct Swapped {
    #[sqlx(flatten)]
    task: TaskRow,
    event_id: i64,
    run_id: Option<i64>,
}

/// One write inside a write transaction: the compare-and-swap on the version (every mutable
/// column set from the record, the row read back in the same statement), then what
/// [`plan::write_steps`] says follows it (the dependents' pending counts when the task became
/// Done, the journal entry, its history entry and its runs), in order.
///
/// Round trips are what a write costs on PostgreSQL (each a wake-up of the server process and
/// of this one), so the history entry (its position from the feed's counter) is written by
/// the compare-and-swap statement itself, in data-modifying CTEs that write only when the
/// swap did; and so is the run the write starts when no run ends before it (a lease: the
/// whole write is one statement). The entry's place among the steps does not matter (it
/// reads and writes only the counter and `task_events`); the run's does when runs end first
/// (ending "the rest" would end it too), so then it keeps its place.
pub(super) async fn write_task(tx: &mut PgConnection, w: &TaskWrite) -> Result<Committed> {
    let n = &w.next;
    let s = &n.state;
    let lease = n.lease.as_ref();
    let steps = plan::write_steps(w);
    let start_with_swap = match w.runs.start.as_ref() {
        Some(run) if !steps.iter().any(|s| matches!(s, Step::EndRuns { .. })) => Some(run),
        _ => None,
    };
    let (run_cte, run_column, run_join) = if start_with_swap.is_some() {
        (
            format!(
                ", r AS (INSERT INTO runs (task_id, phase, patchset, attempt, runner, status, \
                 started_at, train) SELECT $20, $28, $29, {}, $30, 'running', $19, $31 FROM e \
                 RETURNING id)",
                attempt("$20", "$28", "$30")
            ),
            "r.id",
            " CROSS JOIN r",
        )
    } else {
        (String::new(), "NULL::bigint", "")
    };
    let statement = format!(
        "WITH t AS (UPDATE tasks SET status = $1, patchset = $2, failures = $3, \
         lost_leases = $4, cost_cents = $5, cost_at_retry = $6, backoff_until = $7, \
         feedback = $8, amend = $9, lease_id = $10, lease_epoch = $11, lease_runner = $12, \
         lease_runner_id = $13, lease_base = $14, lease_previous = $15, patch_commit = $16, \
         avoid_runner = $17, verified_tree = $18, base_check = $22, approved = $23, \
         version = version + 1, updated_at = $19 \
         WHERE id = $20 AND version = $21 RETURNING {TASK_COLUMNS}), \
         p AS (UPDATE feed_head SET pos = pos + 1 WHERE EXISTS (SELECT 1 FROM t) RETURNING pos), \
         e AS (INSERT INTO task_events (id, task_id, at, kind, from_status, to_status, message) \
         SELECT pos, $20, $19, $24, $25, $26, $27 FROM p RETURNING id){run_cte} \
         SELECT t.*, e.id AS event_id, {run_column} AS run_id FROM t CROSS JOIN e{run_join}"
    );
    let mut query = sqlx::query_as::<_, Swapped>(&statement)
        .bind(s.status.as_str())
        .bind(i64::from(s.patchset))
        .bind(i64::from(s.failures))
        .bind(i64::from(s.lost_leases))
        .bind(s.cost_cents)
        .bind(s.cost_at_retry)
        .bind(s.backoff_until)
        .bind(&s.feedback)
        .bind(s.amend)
        .bind(lease.map(|l| l.id.as_str()))
        .bind(i64::try_from(n.lease_epoch).map_err(|_| {
            Error::Internal(format!("lease epoch {} is out of range", n.lease_epoch))
        })?)
        .bind(lease.map(|l| l.runner.as_str()))
        .bind(lease.map(|l| l.runner_id.as_str()))
        .bind(lease.map(|l| l.base_commit.as_str()))
        .bind(lease.and_then(|l| l.previous_commit.as_ref().map(CommitId::as_str)))
        .bind(n.patch_commit.as_ref().map(CommitId::as_str))
        .bind(n.avoid_runner.as_deref())
        .bind(n.verified_tree.as_ref().map(TreeId::as_str))
        .bind(w.at)
        .bind(w.task_id.as_str())
        .bind(w.expected_version)
        .bind(s.base_check)
        .bind(s.approved)
        .bind(w.event.kind.as_str())
        .bind(w.event.from.as_str())
        .bind(w.event.to.as_str())
        .bind(&w.event.message);
    if let Some(run) = start_with_swap {
        query = query
            .bind(run.phase.as_str())
            .bind(i64::from(run.patchset))
            .bind(&run.runner)
            .bind(run.train);
    }
    let Some(row) = query.fetch_optional(&mut *tx).await? else {
        return Err(plan::lost_race(
            w,
            task_exists(tx, w.task_id.as_str()).await?,
        ));
    };
    let (event_id, mut run_id) = (row.event_id, row.run_id);
    let row = row.task;
    for step in steps {
        match step {
            Step::ReleaseDependents => {
                sqlx::query(
                    "UPDATE tasks SET deps_pending = deps_pending - 1 WHERE deps_pending > 0 \
                     AND id IN (SELECT task_id FROM task_deps WHERE depends_on = $1)",
                )
                .bind(w.task_id.as_str())
                .execute(&mut *tx)
                .await?;
            }
            Step::EndIntegration => {
                sqlx::query("DELETE FROM integrations WHERE task_id = $1")
                    .bind(w.task_id.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            // Written with the compare-and-swap (above).
            Step::Event { .. } => {}
            Step::EndRuns { run, end } => end_runs(tx, &w.task_id, run, end, w.at).await?,
            Step::StartRun(_) if start_with_swap.is_some() => {}
            Step::StartRun(run) => run_id = Some(insert_run(tx, &w.task_id, run, w.at).await?),
            Step::RecordRun(run) => {
                sqlx::query(&format!(
                    "INSERT INTO runs (task_id, phase, patchset, attempt, runner, status, \
                     cost_cents, started_at, finished_at, error, failure_kind, train, builds) \
                     VALUES ($1, $2, $3, {}, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                    attempt("$1", "$2", "$4")
                ))
                .bind(w.task_id.as_str())
                .bind(run.phase.as_str())
                .bind(i64::from(run.patchset))
                .bind(&run.runner)
                .bind(run.status.as_str())
                .bind(run.cost_cents)
                .bind(run.started_at)
                .bind(w.at)
                .bind(&run.error)
                .bind(run.failure_kind.map(FailureKind::as_str))
                .bind(run.train)
                .bind(run.builds.map(i64::from))
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    Ok(Committed {
        task: row.into_task(w.depends_on.clone())?,
        event_id,
        run_id,
    })
}

pub(super) async fn commit(store: &PgStore, w: TaskWrite) -> Result<Committed> {
    let mut tx = store.write().await?;
    let result = write_task(&mut tx, &w).await;
    tx.finish(result).await
}

pub(super) async fn commit_all(
    store: &PgStore,
    writes: Vec<TaskWrite>,
) -> Result<Vec<Result<Committed>>> {
    let mut tx = store.write().await?;
    if writes.len() > 1 && in_one_statement(&writes) {
        let result = write_tasks(&mut tx, &writes).await;
        return tx.finish(result).await;
    }
    let mut out = Vec::with_capacity(writes.len());
    for w in &writes {
        out.push(plan::answer_in_group(write_task(&mut tx, w).await)?);
    }
    tx.commit().await?;
    Ok(out)
}

/// Whether a group of writes can be [`write_tasks`]'s one statement: each write's steps are
/// its history entry and at most the run it starts (a lease; a dispatch round's batch is all
/// leases), and no task is written twice (one row of the `UPDATE` per task).
fn in_one_statement(writes: &[TaskWrite]) -> bool {
    let mut ids = HashSet::with_capacity(writes.len());
    writes.iter().all(|w| {
        ids.insert(w.task_id.as_str())
            && plan::write_steps(w)
                .iter()
                .all(|s| matches!(s, Step::Event { .. } | Step::StartRun(_)))
    })
}

/// What the group's statement returns for each write whose compare-and-swap held: its place
/// in the group (from 1), the task as written, its history entry's position and the run it
/// started.
#[derive(sqlx::FromRow)]
struct SwappedAt {
    n_ord: i64,
    #[sqlx(flatten)]
    task: TaskRow,
    event_id: i64,
    run_id: Option<i64>,
}

/// A group of writes ([`in_one_statement`]) in one statement, one round trip however many
/// (a batch of 256 leases was 256): the writes' values as arrays (`unnest`), the
/// compare-and-swap of every row at once, then in data-modifying CTEs that see only the rows
/// swapped the history entries (positions from the feed's counter in the group's order, as
/// one write after another takes them) and the runs they start. A write whose swap did not
/// hold wrote nothing and gets [`plan::lost_race`]'s error, as alone; the others go on.
async fn write_tasks(
    tx: &mut PgConnection,
    writes: &[TaskWrite],
) -> Result<Vec<Result<Committed>>> {
    let n = writes.len();
    let mut id = Vec::with_capacity(n);
    let mut expected = Vec::with_capacity(n);
    let mut at = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut patchset = Vec::with_capacity(n);
    let mut failures = Vec::with_capacity(n);
    let mut lost_leases = Vec::with_capacity(n);
    let mut cost_cents = Vec::with_capacity(n);
    let mut cost_at_retry = Vec::with_capacity(n);
    let mut backoff_until = Vec::with_capacity(n);
    let mut feedback = Vec::with_capacity(n);
    let mut amend = Vec::with_capacity(n);
    let mut lease_id = Vec::with_capacity(n);
    let mut lease_epoch = Vec::with_capacity(n);
    let mut lease_runner = Vec::with_capacity(n);
    let mut lease_runner_id = Vec::with_capacity(n);
    let mut lease_base = Vec::with_capacity(n);
    let mut lease_previous = Vec::with_capacity(n);
    let mut patch_commit = Vec::with_capacity(n);
    let mut avoid_runner = Vec::with_capacity(n);
    let mut verified_tree = Vec::with_capacity(n);
    let mut base_check = Vec::with_capacity(n);
    let mut approved = Vec::with_capacity(n);
    let mut kind = Vec::with_capacity(n);
    let mut from = Vec::with_capacity(n);
    let mut to = Vec::with_capacity(n);
    let mut message = Vec::with_capacity(n);
    let mut run_phase = Vec::with_capacity(n);
    let mut run_patchset = Vec::with_capacity(n);
    let mut run_runner = Vec::with_capacity(n);
    let mut run_train = Vec::with_capacity(n);
    for w in writes {
        let (next, s) = (&w.next, &w.next.state);
        let lease = next.lease.as_ref();
        id.push(w.task_id.as_str());
        expected.push(w.expected_version);
        at.push(w.at);
        status.push(s.status.as_str());
        patchset.push(i64::from(s.patchset));
        failures.push(i64::from(s.failures));
        lost_leases.push(i64::from(s.lost_leases));
        cost_cents.push(s.cost_cents);
        cost_at_retry.push(s.cost_at_retry);
        backoff_until.push(s.backoff_until);
        feedback.push(s.feedback.as_deref());
        amend.push(s.amend);
        lease_id.push(lease.map(|l| l.id.as_str()));
        lease_epoch.push(i64::try_from(next.lease_epoch).map_err(|_| {
            Error::Internal(format!("lease epoch {} is out of range", next.lease_epoch))
        })?);
        lease_runner.push(lease.map(|l| l.runner.as_str()));
        lease_runner_id.push(lease.map(|l| l.runner_id.as_str()));
        lease_base.push(lease.map(|l| l.base_commit.as_str()));
        lease_previous.push(lease.and_then(|l| l.previous_commit.as_ref().map(CommitId::as_str)));
        patch_commit.push(next.patch_commit.as_ref().map(CommitId::as_str));
        avoid_runner.push(next.avoid_runner.as_deref());
        verified_tree.push(next.verified_tree.as_ref().map(TreeId::as_str));
        base_check.push(s.base_check);
        approved.push(s.approved);
        kind.push(w.event.kind.as_str());
        from.push(w.event.from.as_str());
        to.push(w.event.to.as_str());
        message.push(w.event.message.as_str());
        let run = w.runs.start.as_ref();
        run_phase.push(run.map(|r| r.phase.as_str()));
        run_patchset.push(run.map(|r| i64::from(r.patchset)));
        run_runner.push(run.and_then(|r| r.runner.as_deref()));
        run_train.push(run.and_then(|r| r.train));
    }
    let statement = format!(
        "WITH v AS (SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], \
           $5::bigint[], $6::bigint[], $7::bigint[], $8::float8[], $9::float8[], $10::bigint[], \
           $11::text[], $12::bool[], $13::text[], $14::bigint[], $15::text[], $16::text[], \
           $17::text[], $18::text[], $19::text[], $20::text[], $21::text[], $22::bool[], \
           $23::bool[], $24::text[], $25::text[], $26::text[], $27::text[], $28::text[], \
           $29::bigint[], $30::text[], $31::bigint[]) WITH ORDINALITY AS v (n_id, n_expected, \
           n_at, n_status, n_patchset, n_failures, n_lost_leases, n_cost_cents, \
           n_cost_at_retry, n_backoff_until, n_feedback, n_amend, n_lease_id, n_lease_epoch, \
           n_lease_runner, n_lease_runner_id, n_lease_base, n_lease_previous, n_patch_commit, \
           n_avoid_runner, n_verified_tree, n_base_check, n_approved, n_kind, n_from, n_to, \
           n_message, n_run_phase, n_run_patchset, n_run_runner, n_run_train, n_ord)), \
         t AS (UPDATE tasks SET status = n_status, patchset = n_patchset, \
           failures = n_failures, lost_leases = n_lost_leases, cost_cents = n_cost_cents, \
           cost_at_retry = n_cost_at_retry, backoff_until = n_backoff_until, \
           feedback = n_feedback, amend = n_amend, lease_id = n_lease_id, \
           lease_epoch = n_lease_epoch, lease_runner = n_lease_runner, \
           lease_runner_id = n_lease_runner_id, lease_base = n_lease_base, \
           lease_previous = n_lease_previous, patch_commit = n_patch_commit, \
           avoid_runner = n_avoid_runner, verified_tree = n_verified_tree, \
           base_check = n_base_check, approved = n_approved, version = version + 1, \
           updated_at = n_at \
           FROM v WHERE id = n_id AND version = n_expected RETURNING {TASK_COLUMNS}, n_ord), \
         c AS (SELECT count(*) AS k FROM t), \
         p AS (UPDATE feed_head SET pos = pos + c.k FROM c WHERE c.k > 0 \
           RETURNING pos - c.k AS base), \
         e AS (INSERT INTO task_events (id, task_id, at, kind, from_status, to_status, message) \
           SELECT p.base + row_number() OVER (ORDER BY v.n_ord), v.n_id, v.n_at, v.n_kind, \
             v.n_from, v.n_to, v.n_message \
           FROM t JOIN v ON v.n_ord = t.n_ord CROSS JOIN p RETURNING id, task_id), \
         r AS (INSERT INTO runs (task_id, phase, patchset, attempt, runner, status, \
           started_at, train) \
           SELECT v.n_id, v.n_run_phase, v.n_run_patchset, {}, v.n_run_runner, 'running', \
             v.n_at, v.n_run_train \
           FROM t JOIN v ON v.n_ord = t.n_ord WHERE v.n_run_phase IS NOT NULL \
           RETURNING id, task_id) \
         SELECT t.*, e.id AS event_id, r.id AS run_id FROM t JOIN e ON e.task_id = t.id \
         LEFT JOIN r ON r.task_id = t.id ORDER BY t.n_ord",
        attempt("v.n_id", "v.n_run_phase", "v.n_run_runner")
    );
    let rows: Vec<SwappedAt> = sqlx::query_as(&statement)
        .bind(id)
        .bind(expected)
        .bind(at)
        .bind(status)
        .bind(patchset)
        .bind(failures)
        .bind(lost_leases)
        .bind(cost_cents)
        .bind(cost_at_retry)
        .bind(backoff_until)
        .bind(feedback)
        .bind(amend)
        .bind(lease_id)
        .bind(lease_epoch)
        .bind(lease_runner)
        .bind(lease_runner_id)
        .bind(lease_base)
        .bind(lease_previous)
        .bind(patch_commit)
        .bind(avoid_runner)
        .bind(verified_tree)
        .bind(base_check)
        .bind(approved)
        .bind(kind)
        .bind(from)
        .bind(to)
        .bind(message)
        .bind(run_phase)
        .bind(run_patchset)
        .bind(run_runner)
        .bind(run_train)
        .fetch_all(&mut *tx)
        .await?;
    let mut swapped: HashMap<usize, SwappedAt> = HashMap::with_capacity(rows.len());
    for row in rows {
        let place = usize::try_from(row.n_ord - 1)
            .ok()
            .filter(|p| *p < n)
            .ok_or_else(|| {
                Error::Internal(format!("a write's place {} is out of range", row.n_ord))
            })?;
        swapped.insert(place, row);
    }
    // The writes whose swap did not hold: which of their tasks exist (one read, only then).
    let lost: Vec<&str> = (0..n)
        .filter(|i| !swapped.contains_key(i))
        .map(|i| writes[i].task_id.as_str())
        .collect();
    let existing: HashSet<String> = if lost.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar::<_, String>("SELECT id FROM tasks WHERE id = ANY($1::text[])")
            .bind(&lost)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect()
    };
    let mut out = Vec::with_capacity(n);
    for (i, w) in writes.iter().enumerate() {
        out.push(match swapped.remove(&i) {
            Some(row) => Ok(Committed {
                task: row.task.into_task(w.depends_on.clone())?,
                event_id: row.event_id,
                run_id: row.run_id,
            }),
            None => Err(plan::lost_race(w, existing.contains(w.task_id.as_str()))),
        });
    }
    Ok(out)
}
