//! What [`plan`](crate::store::plan) reads, answered with SQL: [`PlanReads`].

use std::collections::HashMap;

use sqlx::SqliteConnection;

use super::graph::{is_ancestor_task, waited_on};
use super::meta::next_number;
use super::rows::{pairs_of, stored_id, stored_status};
use crate::domain::{TaskId, TaskStatus};
use crate::error::Result;
use crate::store::plan::Reads;

crate::store::sql::plan_reads_on!(SqliteConnection);
