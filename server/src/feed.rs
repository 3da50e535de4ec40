//! The change feed: every state change a person or a program may want to follow, as entries
//! with a position, in one table (`task_events`, migration `0018_feed.sql`) and one
//! in-process broadcast ([`Feed`]).
//!
//! An entry has a position (where a reader resumes), a [`Topic`] (`task`, `runner`,
//! `landing`, `queue`, `train`), a subject (a task ID, a runner's name, a train's ID,
//! `queue`, `landing`), a kind (a task's transition kind, `registered`, `paused`, `formed`…),
//! a time, a line of text and a JSON object of details. A task's entries are its history:
//! they also carry the status it left and the one it reached.
//!
//! Architecture invariant: an entry is written in the transaction of the change it tells of
//! (a task's transition or edit, a pause of the queue or of landing, a train formed or ended;
//! the store's write paths call its `record`), or, for a change that lives in memory only (a
//! runner connecting, its health, a train's step), in a transaction of its own at the moment
//! of the change. Positions are assigned by the store's single writer in commit order, and the
//! store publishes the entries of a transaction on the broadcast after it commits and before
//! the next writer begins, in position order: a reader that follows the broadcast and catches
//! up from storage (`entries_after`) when it lags never skips an entry.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::domain::{CommitId, Millis, TaskEvent, TaskId, TaskStatus};

/// Entries the broadcast keeps for a subscriber that is behind; past that it lags and
/// catches up from storage.
pub const BROADCAST_CAPACITY: usize = 1024;

/// What an entry is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    Task,
    Runner,
    Landing,
    Queue,
    Train,
}

impl Topic {
    pub const ALL: [Topic; 5] = [
        Topic::Task,
        Topic::Runner,
        Topic::Landing,
        Topic::Queue,
        Topic::Train,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Task => "task",
            Topic::Runner => "runner",
            Topic::Landing => "landing",
            Topic::Queue => "queue",
            Topic::Train => "train",
        }
    }

    /// The topic of a word, if it names one.
    pub fn parse(word: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.as_str() == word)
    }
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An entry to write (its position is the store's to give).
#[derive(Clone, Debug, PartialEq)]
pub struct NewEntry {
    pub topic: Topic,
    pub subject: String,
    pub kind: String,
    pub at: Millis,
    pub message: String,
    /// A JSON object (`{}` when there is nothing more to say).
    pub data: String,
}

impl NewEntry {
    /// An entry of `topic` about `subject`, with `data` as its details.
    pub fn new(
        topic: Topic,
        subject: impl Into<String>,
        kind: impl Into<String>,
        at: Millis,
        message: impl Into<String>,
        data: serde_json::Value,
    ) -> Self {
        Self {
            topic,
            subject: subject.into(),
            kind: kind.into(),
            at,
            message: message.into(),
            data: data.to_string(),
        }
    }
}

/// An entry of the feed, as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct FeedEntry {
    pub position: i64,
    pub topic: Topic,
    pub subject: String,
    pub kind: String,
    pub at: Millis,
    /// A task's entry: the status it left (none when it was created).
    pub from: Option<TaskStatus>,
    /// A task's entry: the status it is in.
    pub to: Option<TaskStatus>,
    pub message: String,
    /// A JSON object.
    pub data: String,
}

impl FeedEntry {
    /// The entry as a task's history entry, when it is one.
    pub fn task_event(&self) -> Option<TaskEvent> {
        if self.topic != Topic::Task {
            return None;
        }
        Some(TaskEvent {
            id: self.position,
            task_id: TaskId::parse(&self.subject).ok()?,
            at: self.at,
            kind: crate::domain::EventKind::parse(&self.kind)?,
            from: self.from,
            to: self.to?,
            message: self.message.clone(),
        })
    }

    /// A task's history entry as an entry of the feed.
    pub fn of_task_event(e: &TaskEvent) -> Self {
        Self {
            position: e.id,
            topic: Topic::Task,
            subject: e.task_id.to_string(),
            kind: e.kind.as_str().to_owned(),
            at: e.at,
            from: e.from,
            to: Some(e.to),
            message: e.message.clone(),
            data: "{}".to_owned(),
        }
    }

    /// The entry's details as JSON: a task's carry its `id`, `status` and `from`, and its
    /// `message`; the others their data and their `message`.
    pub fn data_json(&self) -> serde_json::Value {
        let mut data = match serde_json::from_str::<serde_json::Value>(&self.data) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        if self.topic == Topic::Task {
            data.insert("id".into(), self.subject.clone().into());
            if let Some(to) = self.to {
                data.insert("status".into(), to.as_str().into());
            }
            data.insert(
                "from".into(),
                self.from
                    .map_or(serde_json::Value::Null, |f| f.as_str().into()),
            );
        }
        data.insert("message".into(), self.message.clone().into());
        serde_json::Value::Object(data)
    }
}

/// The in-process broadcast of the feed. The store holds it and publishes each
/// transaction's entries after the commit, in position order; every follower subscribes here.
#[derive(Clone)]
pub struct Feed {
    tx: broadcast::Sender<Arc<FeedEntry>>,
}

impl Default for Feed {
    fn default() -> Self {
        Self::new()
    }
}

impl Feed {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Self { tx }
    }

    /// Sends committed entries to every subscriber (the store's writer calls it, in order).
    pub fn publish(&self, entry: FeedEntry) {
        let _ = self.tx.send(Arc::new(entry));
    }

    /// A receiver of every entry published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FeedEntry>> {
        self.tx.subscribe()
    }
}

/// The entry of a train formed on `base` with `tasks`, in order.
pub fn train_formed(id: i64, base: &CommitId, tasks: &[TaskId], at: Millis) -> NewEntry {
    let ids: Vec<&str> = tasks.iter().map(TaskId::as_str).collect();
    NewEntry::new(
        Topic::Train,
        id.to_string(),
        "formed",
        at,
        format!(
            "train {id} formed on {} with {}",
            &base.as_str()[..base.as_str().len().min(12)],
            ids.join(", ")
        ),
        serde_json::json!({ "id": id, "base": base.as_str(), "tasks": ids }),
    )
}

/// The entry of a train's end: its `outcome` (one word), what landed, how many builds it
/// took, its first red commit if one was found.
pub fn train_ended(
    id: i64,
    outcome: &str,
    landed: u32,
    builds: u32,
    red_commit: Option<&CommitId>,
    at: Millis,
) -> NewEntry {
    NewEntry::new(
        Topic::Train,
        id.to_string(),
        "ended",
        at,
        format!("train {id} ended {outcome}: {landed} landed, {builds} builds"),
        serde_json::json!({
            "id": id,
            "outcome": outcome,
            "landed": landed,
            "builds": builds,
            "red_commit": red_commit.map(CommitId::as_str),
        }),
    )
}
