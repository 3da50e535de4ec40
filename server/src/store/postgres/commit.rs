//! The commit path: one compare-and-swap write of a task's record with its history and
//! runs, alone or as a group in one transaction.

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
    let mut out = Vec::with_capacity(writes.len());
    for w in &writes {
        match write_task(&mut tx, w).await {
            // A lost race wrote nothing (the CAS is the first statement): go on.
            Err(e @ (Error::Conflict(_) | Error::NotFound(_))) => out.push(Err(e)),
            Err(other) => return Err(other),
            Ok(done) => out.push(Ok(done)),
        }
    }
    tx.commit().await?;
    Ok(out)
}
