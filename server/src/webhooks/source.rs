//! Where webhooks' events come from, in one small place: the entries after a position, in
//! commit order, each with the event it is (or none) and what it is about.
//!
//! Today the source is the tasks' history (`task_events`, whose IDs are given in commit order
//! by the one writer): a transition to Done, NeedsHelp or Cancelled is `task.done`,
//! `task.needs_help` or `task.cancelled`. When the change feed carries runner and landing
//! entries, [`entries_after`] reads it instead and [`Kind::LandingPaused`],
//! [`Kind::LandingResumed`] and [`Kind::RunnerUnhealthy`] come from it; nothing else changes.

use crate::domain::{Millis, TaskEvent, TaskId, TaskStatus};
use crate::error::Result;
use crate::store::Store;

/// The events a webhook is sent (`CONTRACT.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    TaskDone,
    TaskNeedsHelp,
    TaskCancelled,
    LandingPaused,
    LandingResumed,
    RunnerUnhealthy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::TaskDone,
        Kind::TaskNeedsHelp,
        Kind::TaskCancelled,
        Kind::LandingPaused,
        Kind::LandingResumed,
        Kind::RunnerUnhealthy,
    ];

    /// The body's `type`.
    pub fn word(self) -> &'static str {
        match self {
            Kind::TaskDone => "task.done",
            Kind::TaskNeedsHelp => "task.needs_help",
            Kind::TaskCancelled => "task.cancelled",
            Kind::LandingPaused => "landing.paused",
            Kind::LandingResumed => "landing.resumed",
            Kind::RunnerUnhealthy => "runner.unhealthy",
        }
    }

    pub fn parse(word: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.word() == word)
    }
}

/// The events an endpoint takes (`--webhook-events`; all by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kinds(Vec<Kind>);

impl Default for Kinds {
    fn default() -> Self {
        Self(Kind::ALL.to_vec())
    }
}

impl Kinds {
    /// The events named in `words` (every one when none is named), or why not.
    pub fn parse<T: AsRef<str>>(words: &[T]) -> std::result::Result<Self, String> {
        let words: Vec<&str> = words
            .iter()
            .map(|w| w.as_ref().trim())
            .filter(|w| !w.is_empty())
            .collect();
        if words.is_empty() {
            return Ok(Self::default());
        }
        let mut kinds = Vec::new();
        for word in words {
            let kind = Kind::parse(word).ok_or_else(|| {
                let known: Vec<&str> = Kind::ALL.iter().map(|k| k.word()).collect();
                format!(
                    "--webhook-events: unknown event {word:?}; use {}",
                    known.join(", ")
                )
            })?;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        Ok(Self(kinds))
    }

    pub fn contains(&self, kind: Kind) -> bool {
        self.0.contains(&kind)
    }
}

/// What an entry is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Task(TaskId),
}

/// One entry of the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its position: entries come in commit order, and a later one has a larger position.
    pub position: i64,
    /// The event it is, if it is one webhooks are sent.
    pub kind: Option<Kind>,
    pub at: Millis,
    pub subject: Subject,
}

/// The event a task's history entry is, if any: a transition into Done, NeedsHelp or
/// Cancelled (not an entry that leaves the status as it was, such as a note).
pub fn kind_of(event: &TaskEvent) -> Option<Kind> {
    if event.from == Some(event.to) {
        return None;
    }
    match event.to {
        TaskStatus::Done => Some(Kind::TaskDone),
        TaskStatus::NeedsHelp => Some(Kind::TaskNeedsHelp),
        TaskStatus::Cancelled => Some(Kind::TaskCancelled),
        _ => None,
    }
}

/// The source's newest position (0 when it is empty): where a new endpoint starts.
pub async fn head<S: Store>(store: &S) -> Result<i64> {
    store.last_event_id().await
}

/// The entries after `after`, oldest first, at most `limit`.
pub async fn entries_after<S: Store>(store: &S, after: i64, limit: u32) -> Result<Vec<Entry>> {
    Ok(store
        .events_after(after, limit)
        .await?
        .into_iter()
        .map(|e| Entry {
            position: e.id,
            kind: kind_of(&e),
            at: e.at,
            subject: Subject::Task(e.task_id),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(from: Option<TaskStatus>, to: TaskStatus) -> TaskEvent {
        TaskEvent {
            id: 1,
            task_id: TaskId::parse("t-1").expect("id"),
            at: 0,
            kind: "k".into(),
            from,
            to,
            message: String::new(),
        }
    }

    #[test]
    fn transitions_into_done_needs_help_and_cancelled_are_events() {
        use TaskStatus::*;
        let check = |from, to, expect| assert_eq!(kind_of(&event(from, to)), expect);
        check(Some(Verified), Done, Some(Kind::TaskDone));
        check(Some(InProgress), NeedsHelp, Some(Kind::TaskNeedsHelp));
        check(Some(Open), Cancelled, Some(Kind::TaskCancelled));
        check(Some(NeedsHelp), NeedsHelp, None);
        check(Some(InProgress), Verified, None);
        check(None, Open, None);
    }

    #[test]
    fn parses_the_events_an_endpoint_takes() {
        assert_eq!(Kinds::parse::<&str>(&[]), Ok(Kinds::default()));
        let some = Kinds::parse(&["task.done", " task.cancelled", "task.done"]).expect("parse");
        assert!(some.contains(Kind::TaskDone) && some.contains(Kind::TaskCancelled));
        assert!(!some.contains(Kind::TaskNeedsHelp));
        let bad = Kinds::parse(&["task.landed"]).expect_err("unknown");
        assert!(
            bad.contains("\"task.landed\"") && bad.contains("task.done"),
            "{bad}"
        );
    }
}
