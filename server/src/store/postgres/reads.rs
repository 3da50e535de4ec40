//! What [`plan`](crate::store::plan) reads, answered with SQL: [`PlanReads`].

use std::collections::HashMap;

use sqlx::PgConnection;

use super::graph::{is_ancestor_task, waited_on};
use super::meta::next_number;
use super::rows::{pairs_of, stored_id, stored_status};
use crate::domain::{TaskId, TaskStatus};
use crate::error::Result;
use crate::store::plan::Reads;

/// The plan's reads on a connection (inside the write transaction that then writes the plan).
pub(super) struct PlanReads<'a>(pub(super) &'a mut PgConnection);

impl Reads for PlanReads<'_> {
    async fn statuses(&mut self, ids: &[&TaskId]) -> Result<HashMap<TaskId, TaskStatus>> {
        let ids: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        let found = pairs_of(self.0, "SELECT id, status FROM tasks WHERE id IN (", &ids).await?;
        found
            .into_iter()
            .map(|(id, status)| Ok((stored_id(&id)?, stored_status(&status)?)))
            .collect()
    }

    async fn paused(&mut self, ids: &[&TaskId]) -> Result<HashMap<TaskId, String>> {
        let ids: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        let found = pairs_of(
            self.0,
            "SELECT id, paused FROM tasks WHERE paused IS NOT NULL AND id IN (",
            &ids,
        )
        .await?;
        found
            .into_iter()
            .map(|(id, why)| Ok((stored_id(&id)?, why)))
            .collect()
    }

    async fn next_number(&mut self) -> Result<u64> {
        next_number(self.0).await
    }

    async fn waited_on(&mut self, ids: &[&TaskId]) -> Result<Vec<TaskId>> {
        let ids: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        waited_on(self.0, &ids).await
    }

    async fn is_ancestor(&mut self, ancestor: &TaskId, task: &TaskId) -> Result<bool> {
        is_ancestor_task(self.0, ancestor, task).await
    }
}
