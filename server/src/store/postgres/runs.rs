//! Runs: started, ended, read, and what they cost.

use sqlx::{PgConnection, Postgres};

use super::PgStore;
use super::rows::{RUN_COLUMNS, RunRow, stored_id, tokens_to_sql};
use crate::domain::{FailureKind, Millis, Phase, Run, TaskId};
use crate::error::{Error, Result};
use crate::store::{NewRun, RunEnd, UsageBucket};

/// A new run's attempt (the placeholders of the task, the phase and the runner): its place among the
/// task's runs of its phase by the same party (runners, or the server); a server's verify run
/// (its build of the base a runner's verification failed on) takes the attempt of the
/// runner's verification it settles, so `logs --run N` shows them together.
pub(super) fn attempt(task: &str, phase: &str, runner: &str) -> String {
    format!(
        "CASE WHEN {phase} = 'verify' AND {runner}::text IS NULL \
         THEN (SELECT GREATEST(COUNT(*), 1) FROM runs \
               WHERE task_id = {task} AND phase = 'verify' AND runner IS NOT NULL) \
         ELSE (SELECT COUNT(*) + 1 FROM runs \
               WHERE task_id = {task} AND phase = {phase} \
               AND (runner IS NULL) = ({runner}::text IS NULL)) END"
    )
}

/// Inserts a run that starts now; returns its ID.
pub(super) async fn insert_run(
    tx: &mut PgConnection,
    task: &TaskId,
    run: &NewRun,
    at: Millis,
) -> Result<i64> {
    Ok(sqlx::query_scalar(&format!(
        "INSERT INTO runs (task_id, phase, patchset, attempt, runner, status, started_at, \
             train) VALUES ($1, $2, $3, {}, $4, 'running', $5, $6) RETURNING id",
        attempt("$1", "$2", "$4")
    ))
    .bind(task.as_str())
    .bind(run.phase.as_str())
    .bind(i64::from(run.patchset))
    .bind(&run.runner)
    .bind(at)
    .bind(run.train)
    .fetch_one(&mut *tx)
    .await?)
}

/// Ends runs of `task` still running: the one `run`, or all of them.
pub(super) async fn end_runs(
    tx: &mut PgConnection,
    task: &TaskId,
    run: Option<i64>,
    end: &RunEnd,
    at: Millis,
) -> Result<()> {
    let u = end.usage.as_ref();
    sqlx::query(
        "UPDATE runs SET status = $1, finished_at = $2, cost_cents = cost_cents + $3, \
         error = $4, failure_kind = $5, builds = COALESCE($8, builds), agent = $9, \
         model = $10, input_tokens = $11, cached_input_tokens = $12, cache_write_tokens = $13, \
         output_tokens = $14, reasoning_tokens = $15, cost_source = $16, usage_complete = $17, \
         session_id = $18 \
         WHERE task_id = $6 AND status = 'running' AND ($7::bigint IS NULL OR id = $7)",
    )
    .bind(end.status.as_str())
    .bind(at)
    .bind(end.cost_cents)
    .bind(&end.error)
    .bind(end.failure_kind.map(FailureKind::as_str))
    .bind(task.as_str())
    .bind(run)
    .bind(end.builds.map(i64::from))
    .bind(u.map(|u| u.agent.as_str()))
    .bind(u.and_then(|u| u.model.as_deref()))
    .bind(u.map(|u| tokens_to_sql(u.input_tokens)))
    .bind(u.map(|u| tokens_to_sql(u.cached_input_tokens)))
    .bind(u.map(|u| tokens_to_sql(u.cache_write_tokens)))
    .bind(u.map(|u| tokens_to_sql(u.output_tokens)))
    .bind(u.map(|u| tokens_to_sql(u.reasoning_tokens)))
    .bind(u.map(|u| u.cost_source.as_str()))
    .bind(u.map(|u| u.complete))
    .bind(u.and_then(|u| u.session_id.as_deref()))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

pub(super) async fn runs(store: &PgStore, id: &TaskId) -> Result<Vec<Run>> {
    let rows: Vec<RunRow> = sqlx::query_as(&format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE task_id = $1 ORDER BY id"
    ))
    .bind(id.as_str())
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter().map(RunRow::into_run).collect()
}

pub(super) async fn tokens_of(store: &PgStore, ids: &[TaskId]) -> Result<Vec<(TaskId, u64)>> {
    let mut out = Vec::with_capacity(ids.len());
    // By runs_by_task, one parameter a task.
    for chunk in ids.chunks(10_000) {
        let mut q = sqlx::QueryBuilder::<Postgres>::new(
            "SELECT task_id, SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0))::bigint \
             FROM runs WHERE input_tokens IS NOT NULL AND task_id IN (",
        );
        let mut list = q.separated(", ");
        for id in chunk {
            list.push_bind(id.as_str());
        }
        q.push(") GROUP BY task_id");
        let rows: Vec<(String, i64)> = q.build_query_as().fetch_all(&store.pool).await?;
        for (id, tokens) in rows {
            out.push((stored_id(&id)?, u64::try_from(tokens).unwrap_or(0)));
        }
    }
    Ok(out)
}

pub(super) async fn running_runs(store: &PgStore, task: &TaskId) -> Result<Vec<Run>> {
    let rows: Vec<RunRow> = sqlx::query_as(&format!(
        "SELECT {RUN_COLUMNS} FROM runs \
         WHERE task_id = $1 AND status = 'running' ORDER BY id"
    ))
    .bind(task.as_str())
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter().map(RunRow::into_run).collect()
}

pub(super) async fn usage_since(
    store: &PgStore,
    since: Millis,
    bucket_ms: Millis,
) -> Result<Vec<UsageBucket>> {
    // The terms of runs_charged's WHERE, so the index serves the range.
    let rows: Vec<(i64, f64, f64)> = sqlx::query_as(
        "SELECT finished_at / $2 AS bucket, COALESCE(SUM(cost_cents), 0)::float8, \
         COALESCE(SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)), 0)::float8 \
         FROM runs \
         WHERE (cost_cents > 0 OR agent IS NOT NULL) AND finished_at >= $1 \
         GROUP BY bucket ORDER BY bucket",
    )
    .bind(since)
    .bind(bucket_ms.max(1))
    .fetch_all(&store.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(bucket, cost_cents, tokens)| UsageBucket {
            start: bucket * bucket_ms.max(1),
            cost_cents,
            // A float sum, whole and bounded by the edge's caps.
            tokens: tokens as u64,
        })
        .collect())
}

pub(super) async fn latest_session(store: &PgStore, task: &TaskId) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT session_id FROM runs WHERE task_id = $1 AND phase = 'dev' \
         AND session_id IS NOT NULL ORDER BY id DESC LIMIT 1",
    )
    .bind(task.as_str())
    .fetch_optional(&store.pool)
    .await?)
}

pub(super) async fn start_run(
    store: &PgStore,
    task: &TaskId,
    run: &NewRun,
    at: Millis,
) -> Result<i64> {
    let mut tx = store.write().await?;
    let result = insert_run(&mut tx, task, run, at).await;
    tx.finish(result).await
}

pub(super) async fn end_run(store: &PgStore, run: i64, end: &RunEnd, at: Millis) -> Result<()> {
    let mut tx = store.write().await?;
    let task: Option<String> = sqlx::query_scalar("SELECT task_id FROM runs WHERE id = $1")
        .bind(run)
        .fetch_optional(&mut *tx)
        .await?;
    let result = match task {
        Some(task) => end_runs(&mut tx, &stored_id(&task)?, Some(run), end, at).await,
        None => Err(Error::NotFound(format!("run {run} does not exist"))),
    };
    tx.finish(result).await
}

pub(super) async fn abandon_runs(
    store: &PgStore,
    phase: Phase,
    error: &str,
    at: Millis,
) -> Result<u64> {
    let mut tx = store.write().await?;
    let done = sqlx::query(
        "UPDATE runs SET status = 'failure', finished_at = $1, error = $2, \
         failure_kind = 'infrastructure' \
         WHERE status = 'running' AND phase = $3 AND runner IS NULL",
    )
    .bind(at)
    .bind(error)
    .bind(phase.as_str())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

pub(super) async fn run(store: &PgStore, id: i64) -> Result<Option<Run>> {
    let row: Option<RunRow> =
        sqlx::query_as(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&store.pool)
            .await?;
    row.map(RunRow::into_run).transpose()
}
