//! Merge trains and the journal of base moves in flight.

use super::PgStore;
use super::rows::{stored_commit, stored_id, to_u32};
use crate::domain::{Millis, TaskId, TaskStatus};
use crate::error::{Error, Result};
use crate::store::{Journal, TrainEnd, TrainStat};
use pipeline_core::ids::CommitId;

pub(super) async fn begin_integration(
    store: &PgStore,
    entries: &[(Journal, CommitId)],
) -> Result<Option<TaskId>> {
    let mut tx = store.write().await?;
    let result: Result<Option<TaskId>> = async {
        for (entry, commit) in entries {
            let done = sqlx::query(
                "INSERT INTO integrations (task_id, old_tip, new_commit, started_at, train) \
                 SELECT $1, $2, $3, $4, $7 WHERE EXISTS (SELECT 1 FROM tasks \
                   WHERE id = $1 AND status = $5 AND patch_commit = $6) \
                 ON CONFLICT (task_id) DO UPDATE SET old_tip = EXCLUDED.old_tip, \
                   new_commit = EXCLUDED.new_commit, started_at = EXCLUDED.started_at, \
                   train = EXCLUDED.train",
            )
            .bind(entry.task_id.as_str())
            .bind(entry.old_tip.as_str())
            .bind(entry.new_commit.as_str())
            .bind(entry.started_at)
            .bind(TaskStatus::Verified.as_str())
            .bind(commit.as_str())
            .bind(entry.train)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                return Ok(Some(entry.task_id.clone()));
            }
        }
        Ok(None)
    }
    .await;
    match result {
        Ok(None) => {
            tx.commit().await?;
            Ok(None)
        }
        Ok(Some(changed)) => {
            tx.rollback().await;
            Ok(Some(changed))
        }
        Err(e) => tx.finish(Err(e)).await,
    }
}

pub(super) async fn start_train(
    store: &PgStore,
    base_tip: &CommitId,
    tasks: &[TaskId],
    at: Millis,
) -> Result<i64> {
    let mut tx = store.write().await?;
    let result = async {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO trains (base_tip, started_at) VALUES ($1, $2) RETURNING id",
        )
        .bind(base_tip.as_str())
        .bind(at)
        .fetch_one(&mut *tx)
        .await?;
        super::events::record(&mut tx, &crate::feed::train_formed(id, base_tip, tasks, at)).await?;
        Ok(id)
    }
    .await;
    tx.finish(result).await
}

pub(super) async fn end_train(store: &PgStore, id: i64, end: &TrainEnd, at: Millis) -> Result<()> {
    let mut tx = store.write().await?;
    let result = sqlx::query(
        "UPDATE trains SET ended_at = $1, outcome = $2, builds = $3, landed = $4, \
         red_commit = $5 WHERE id = $6",
    )
    .bind(at)
    .bind(end.outcome.as_str())
    .bind(i64::from(end.builds))
    .bind(i64::from(end.landed))
    .bind(end.red_commit.as_ref().map(CommitId::as_str))
    .bind(id)
    .execute(&mut *tx)
    .await
    .map(drop)
    .map_err(Error::from);
    let result = match result {
        Ok(()) => super::events::record(
            &mut tx,
            &crate::feed::train_ended(
                id,
                end.outcome.as_str(),
                end.landed,
                end.builds,
                end.red_commit.as_ref(),
                at,
            ),
        )
        .await
        .map(drop),
        Err(e) => Err(e),
    };
    tx.finish(result).await
}

pub(super) async fn trains_since(store: &PgStore, since: Millis) -> Result<Vec<TrainStat>> {
    let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT started_at, ended_at, builds, landed FROM trains \
         WHERE ended_at IS NOT NULL AND ended_at >= $1 ORDER BY ended_at",
    )
    .bind(since)
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter()
        .map(|(started_at, ended_at, builds, landed)| {
            Ok(TrainStat {
                started_at,
                ended_at,
                builds: to_u32("builds", builds)?,
                landed: to_u32("landed", landed)?,
            })
        })
        .collect()
}

pub(super) async fn trains_in_flight(store: &PgStore) -> Result<Vec<(i64, Vec<TaskId>)>> {
    let rows: Vec<(i64, String)> = sqlx::query_as(crate::store::rows::TRAINS_IN_FLIGHT)
        .fetch_all(&store.pool)
        .await?;
    crate::store::rows::trains_in_flight(rows)
}

pub(super) async fn abort_integration(store: &PgStore, task: &TaskId) -> Result<()> {
    let mut tx = store.write().await?;
    sqlx::query("DELETE FROM integrations WHERE task_id = $1")
        .bind(task.as_str())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn pending_integrations(store: &PgStore) -> Result<Vec<Journal>> {
    let rows: Vec<(String, String, String, i64, Option<i64>)> = sqlx::query_as(
        "SELECT task_id, old_tip, new_commit, started_at, train FROM integrations \
         ORDER BY started_at",
    )
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter()
        .map(|(task, old_tip, new_commit, started_at, train)| {
            Ok(Journal {
                task_id: stored_id(&task)?,
                train,
                old_tip: stored_commit(&old_tip)?,
                new_commit: stored_commit(&new_commit)?,
                started_at,
            })
        })
        .collect()
}
