//! The commit path: one compare-and-swap write of a task's record with its history and
//! runs, alone or as a group in one transaction.

use sqlx::SqliteConnection;

use super::SqliteStore;
use super::events::insert_event;
use super::rows::{TASK_COLUMNS, TaskRow, task_exists};
use super::runs::{ATTEMPT, end_runs, insert_run};
use crate::domain::FailureKind;
use crate::error::{Error, Result};
use crate::store::plan::{self, Step};
use crate::store::{Committed, TaskWrite};
use pipeline_core::ids::{CommitId, TreeId};

/// One write inside a write transaction: the compare-and-swap on the version (every mutable
/// column set from the record, the row read back in the same statement), then what
/// [`plan::write_steps`] says follows it (the dependents' pending counts when the task became
/// Done, the journal entry, its history entry and its runs), in order.
pub(super) async fn write_task(tx: &mut SqliteConnection, w: &TaskWrite) -> Result<Committed> {
    let n = &w.next;
    let s = &n.state;
    let lease = n.lease.as_ref();
    let row: Option<TaskRow> =
        sqlx::query_as(&format!(
            "UPDATE tasks SET status = ?1, patchset = ?2, failures = ?3, lost_leases = ?4, \
         cost_cents = ?5, cost_at_retry = ?6, backoff_until = ?7, feedback = ?8, amend = ?9, \
         lease_id = ?10, lease_epoch = ?11, lease_runner = ?12, lease_runner_id = ?13, \
         lease_base = ?14, lease_previous = ?15, patch_commit = ?16, avoid_runner = ?17, \
         verified_tree = ?18, base_check = ?22, approved = ?23, version = version + 1, \
         updated_at = ?19 \
         WHERE id = ?20 AND version = ?21 RETURNING {TASK_COLUMNS}"
        ))
        .bind(s.status.as_str())
        .bind(i64::from(s.patchset))
        .bind(i64::from(s.failures))
        .bind(i64::from(s.lost_leases))
        .bind(s.cost_cents)
        .bind(s.cost_at_retry)
        .bind(s.backoff_until)
        .bind(&s.feedback)
        .bind(i64::from(s.amend))
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
        .bind(i64::from(s.base_check))
        .bind(i64::from(s.approved))
        .fetch_optional(&mut *tx)
        .await?;
    let Some(row) = row else {
        return Err(plan::lost_race(
            w,
            task_exists(tx, w.task_id.as_str()).await?,
        ));
    };
    let (mut event_id, mut run_id) = (0, None);
    for step in plan::write_steps(w) {
        match step {
            Step::ReleaseDependents => {
                sqlx::query(
                    "UPDATE tasks SET deps_pending = deps_pending - 1 WHERE deps_pending > 0 \
                     AND id IN (SELECT task_id FROM task_deps WHERE depends_on = ?)",
                )
                .bind(w.task_id.as_str())
                .execute(&mut *tx)
                .await?;
            }
            Step::EndIntegration => {
                sqlx::query("DELETE FROM integrations WHERE task_id = ?")
                    .bind(w.task_id.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            Step::Event {
                kind,
                from,
                to,
                message,
            } => {
                event_id =
                    insert_event(tx, &w.task_id, w.at, kind.as_str(), Some(from), to, message)
                        .await?;
            }
            Step::EndRuns { run, end } => end_runs(tx, &w.task_id, run, end, w.at).await?,
            Step::StartRun(run) => run_id = Some(insert_run(tx, &w.task_id, run, w.at).await?),
            Step::RecordRun(run) => {
                sqlx::query(&format!(
                    "INSERT INTO runs (task_id, phase, patchset, attempt, runner, status, \
                     cost_cents, started_at, finished_at, error, failure_kind, train, builds) \
                     VALUES (?1, ?2, ?3, {ATTEMPT}, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
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

pub(super) async fn commit(store: &SqliteStore, w: TaskWrite) -> Result<Committed> {
    let mut tx = store.write().await?;
    let result = write_task(&mut tx, &w).await;
    tx.finish(result).await
}

pub(super) async fn commit_all(
    store: &SqliteStore,
    writes: Vec<TaskWrite>,
) -> Result<Vec<Result<Committed>>> {
    let mut tx = store.write().await?;
    let mut out = Vec::with_capacity(writes.len());
    for w in &writes {
        out.push(plan::answer_in_group(write_task(&mut tx, w).await)?);
    }
    tx.commit().await?;
    Ok(out)
}
