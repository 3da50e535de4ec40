//! Where webhooks' events come from, in one small place: the entries after a position, in
//! commit order, each with the event it is (or none) and what it is about.
//!
//! The source is the change feed (`Store::entries_after`, positions in commit order): a task's
//! transition to Done, NeedsHelp or Cancelled is `task.done`, `task.needs_help` or
//! `task.cancelled`; landing's `paused` and `resumed` entries are `landing.paused` and
//! `landing.resumed`; a runner's `unhealthy` entry is `runner.unhealthy`, about the runner.

use crate::domain::{Millis, TaskEvent, TaskId, TaskStatus};
use crate::error::Result;
use crate::feed::{FeedEntry, Topic};
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
    /// A runner, by name, with what its entry reported (its health and reason).
    Runner {
        name: String,
        reported: serde_json::Value,
    },
    /// Landing: what its feed entry says (its name and its details).
    Other(serde_json::Value),
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

/// The event a feed entry is, if any.
pub fn kind_of_entry(entry: &FeedEntry) -> Option<Kind> {
    match entry.topic {
        Topic::Task => entry.task_event().as_ref().and_then(kind_of),
        Topic::Landing => match entry.kind.as_str() {
            "paused" => Some(Kind::LandingPaused),
            "resumed" => Some(Kind::LandingResumed),
            _ => None,
        },
        Topic::Runner => (entry.kind == "unhealthy").then_some(Kind::RunnerUnhealthy),
        _ => None,
    }
}

/// What a feed entry is about: a task by its ID or a runner by its name (each sent as it is
/// when delivered), or the entry's own details with its subject's name (landing's state and
/// reason).
fn subject_of(entry: &FeedEntry) -> Subject {
    if entry.topic == Topic::Task
        && let Ok(id) = TaskId::parse(&entry.subject)
    {
        return Subject::Task(id);
    }
    if entry.topic == Topic::Runner {
        return Subject::Runner {
            name: entry.subject.clone(),
            reported: entry.data_json(),
        };
    }
    let mut data = entry.data_json();
    if let serde_json::Value::Object(map) = &mut data {
        map.insert("name".into(), entry.subject.clone().into());
    }
    Subject::Other(data)
}

/// The source's newest position (0 when it is empty): where a new endpoint starts.
pub async fn head<S: Store>(store: &S) -> Result<i64> {
    store.last_event_id().await
}

/// The entries after `after`, oldest first, at most `limit`.
pub async fn entries_after<S: Store>(store: &S, after: i64, limit: u32) -> Result<Vec<Entry>> {
    Ok(store
        .entries_after(after, limit)
        .await?
        .iter()
        .map(|e| Entry {
            position: e.position,
            kind: kind_of_entry(e),
            at: e.at,
            subject: subject_of(e),
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
            kind: crate::domain::EventKind::Edited,
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

    fn entry(topic: Topic, subject: &str, kind: &str, data: &str) -> FeedEntry {
        FeedEntry {
            position: 3,
            topic,
            subject: subject.into(),
            kind: kind.into(),
            at: 0,
            from: None,
            to: None,
            message: String::new(),
            data: data.into(),
        }
    }

    #[test]
    fn landing_and_runner_entries_of_the_feed_are_events_with_their_details() {
        let paused = entry(Topic::Landing, "landing", "paused", r#"{"reason":"why"}"#);
        assert_eq!(kind_of_entry(&paused), Some(Kind::LandingPaused));
        let resumed = entry(Topic::Landing, "landing", "resumed", "{}");
        assert_eq!(kind_of_entry(&resumed), Some(Kind::LandingResumed));
        let sick = entry(
            Topic::Runner,
            "r1",
            "unhealthy",
            r#"{"health":"unhealthy","health_reason":"disk full"}"#,
        );
        assert_eq!(kind_of_entry(&sick), Some(Kind::RunnerUnhealthy));
        let Subject::Runner { name, reported } = subject_of(&sick) else {
            panic!("a runner's entry is about the runner")
        };
        assert_eq!(name, "r1");
        assert_eq!(reported["health_reason"], "disk full");
        let Subject::Other(data) = subject_of(&paused) else {
            panic!("landing's entry carries its details")
        };
        assert_eq!(
            (&data["name"], &data["reason"]),
            (&"landing".into(), &"why".into())
        );
        assert_eq!(
            kind_of_entry(&entry(Topic::Runner, "r1", "healthy", "{}")),
            None
        );
        assert_eq!(
            kind_of_entry(&entry(Topic::Runner, "r1", "connected", "{}")),
            None
        );
        assert_eq!(
            kind_of_entry(&entry(Topic::Queue, "queue", "paused", "{}")),
            None
        );
        let mut done = entry(Topic::Task, "t-1", "integrated", "{}");
        done.from = Some(TaskStatus::Verified);
        done.to = Some(TaskStatus::Done);
        assert_eq!(kind_of_entry(&done), Some(Kind::TaskDone));
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
