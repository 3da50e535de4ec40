//! The queue as a whole: the merge train now and what waits behind it (`pipelinectl queue`),
//! and its pauses. `queue pause` stops new leases (and landing, with `--landing`); a base
//! that fails its own build pauses landing by itself, until the base changes or
//! `queue resume`. A pause is written to `meta` before memory follows.

use crate::domain::{TaskId, TaskStatus};
use crate::error::{Error, Result};
use crate::landing::{self, Pause, QueuePause, TrainView};
use crate::lifecycle;
use crate::store::{Store, TaskFilter};

use super::Coordinator;

/// The most waiting tasks `queue` lists.
pub const QUEUE_LIMIT: usize = 200;

/// A task waiting to land or to be leased, for `queue`.
#[derive(Clone, Debug)]
pub struct Waiting {
    pub id: TaskId,
    pub status: TaskStatus,
    /// 1-based, in the order they will land (Verified) or be leased (Open, after them).
    pub position: u32,
    pub waiting_for: Vec<String>,
    /// When a Verified task is expected to land, from the recent trains; when an Open one
    /// that waits only for a slot is expected to start, from the free slots and the recent
    /// dev runs.
    pub eta_seconds: Option<f64>,
}

/// What `queue` shows.
#[derive(Clone, Debug)]
pub struct QueueView {
    pub train: Option<TrainView>,
    pub waiting: Vec<Waiting>,
    pub landing: (&'static str, Option<String>),
    pub queue_paused: bool,
    pub queue_pause_reason: Option<String>,
}

impl<S: Store> Coordinator<S> {
    /// Loads the pauses and the last hour's trains (at start-up, before serving).
    pub async fn load_landing(&self) -> Result<()> {
        let paused = match self.store.get_meta(landing::LANDING_PAUSED).await? {
            Some(json) => Some(serde_json::from_str::<Pause>(&json).map_err(|e| {
                Error::Internal(format!("the stored landing pause is unreadable: {e}"))
            })?),
            None => None,
        };
        let queue_paused = match self.store.get_meta(landing::QUEUE_PAUSED).await? {
            Some(json) => Some(serde_json::from_str::<QueuePause>(&json).map_err(|e| {
                Error::Internal(format!("the stored queue pause is unreadable: {e}"))
            })?),
            None => None,
        };
        let now = self.now();
        let recent = self.store.trains_since(now - landing::WINDOW_MS).await?;
        let mut state = self.landing();
        state.paused = paused;
        state.queue_paused = queue_paused;
        state.load(recent, now);
        Ok(())
    }

    /// Stops new leases (running work goes on), and landing too with `landing`.
    pub async fn pause_queue(&self, reason: Option<String>, landing: bool) -> Result<()> {
        // Pausing what is paused keeps when it began, and its reason unless a new one is given.
        let pause = match self.landing().queue_paused.clone() {
            Some(before) => QueuePause {
                reason: reason.clone().or(before.reason),
                at: before.at,
            },
            None => QueuePause {
                reason: reason.clone(),
                at: Some(self.now()),
            },
        };
        self.store
            .put_meta(landing::QUEUE_PAUSED, &to_json(&pause)?)
            .await?;
        self.landing().queue_paused = Some(pause);
        if landing {
            self.pause_landing(Pause {
                reason: reason.unwrap_or_else(|| "paused by pipelinectl queue pause".to_owned()),
                red_base: None,
            })
            .await?;
        }
        tracing::info!(landing, "queue paused");
        Ok(())
    }

    /// Lifts every pause (leases, landing, a red base's); wakes the dispatcher and the
    /// integrator. Returns whether anything was paused.
    pub async fn resume_queue(&self) -> Result<bool> {
        let was_paused = {
            let l = self.landing();
            l.queue_paused.is_some() || l.paused.is_some()
        };
        self.store.delete_meta(landing::QUEUE_PAUSED).await?;
        self.landing().queue_paused = None;
        self.resume_landing("pipelinectl queue resume").await?;
        self.wake_dispatch();
        tracing::info!("queue resumed");
        Ok(was_paused)
    }

    /// Whether new leases are paused.
    pub fn leases_paused(&self) -> bool {
        self.landing().queue_paused.is_some()
    }

    /// Pauses landing.
    pub(crate) async fn pause_landing(&self, pause: Pause) -> Result<()> {
        self.store
            .put_meta(landing::LANDING_PAUSED, &to_json(&pause)?)
            .await?;
        tracing::warn!(reason = %pause.reason, "landing paused");
        self.landing().paused = Some(pause);
        Ok(())
    }

    /// Lets landing go on.
    pub(crate) async fn resume_landing(&self, why: &str) -> Result<()> {
        if self.landing().paused.is_none() {
            return Ok(());
        }
        self.store.delete_meta(landing::LANDING_PAUSED).await?;
        self.landing().paused = None;
        tracing::info!("landing resumes: {why}");
        self.integrator_wakeup().notify_one();
        Ok(())
    }

    /// The train now, then the Verified tasks in landing order, then the Open ones in lease
    /// order (at most [`QUEUE_LIMIT`] in all).
    pub async fn queue(&self) -> Result<QueueView> {
        let (train, landing_state, queue_paused, queue_pause_reason) = {
            let l = self.landing();
            let pause = l.queue_paused.as_ref();
            (
                l.train.clone(),
                l.state(),
                pause.is_some(),
                pause.and_then(|p| p.reason.clone()),
            )
        };
        let in_train = |id: &TaskId| train.as_ref().is_some_and(|t| t.tasks.contains(id));
        let mut waiting = Vec::new();
        let verified = self.store.verified().await?;
        let room = QUEUE_LIMIT.saturating_sub(verified.len());
        let open = self
            .store
            .list_tasks(&TaskFilter::status(TaskStatus::Open), None, room as u32)
            .await?;
        let batch_max = self.settings.batch_max;
        let (capacity, _) = self.capacity();
        // Open tasks that wait for nothing but a slot, so far: the next one's place in line.
        let mut startable = 0;
        for task in verified
            .into_iter()
            .filter(|t| !in_train(&t.id))
            // An epic is never leased: its children are in the line, not it.
            .chain(open.into_iter().filter(|t| !t.children.any()))
            .take(QUEUE_LIMIT)
        {
            let position = waiting.len();
            let waiting_for = self.waiting_for(&task).await?;
            let eta_seconds = match task.state.status {
                TaskStatus::Verified => self.landing().eta_secs(position, batch_max),
                TaskStatus::Open
                    if waiting_for
                        .iter()
                        .all(|w| w.starts_with(lifecycle::ALL_SLOTS_BUSY)) =>
                {
                    startable += 1;
                    self.landing().start_eta_secs(
                        startable - 1,
                        capacity.free_slots,
                        capacity.slots,
                    )
                }
                _ => None,
            };
            waiting.push(Waiting {
                id: task.id,
                status: task.state.status,
                position: u32::try_from(position + 1).unwrap_or(u32::MAX),
                waiting_for,
                eta_seconds,
            });
        }
        Ok(QueueView {
            train,
            waiting,
            landing: landing_state,
            queue_paused,
            queue_pause_reason,
        })
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Internal(format!("cannot encode: {e}")))
}
