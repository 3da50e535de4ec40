//! The JSON shapes of `CONTRACT.md`, in one place: what `pipelinectl … --json` prints and what
//! the server's HTTP API (`/api/…`) answers, key for key. Statuses are lowercase words, times
//! RFC 3339 strings, absent values null; objects print with their keys in order (serde_json's
//! map), so the same view gives the same bytes wherever it is printed.

use serde_json::{Value, json};

use crate::model::{
    FailureKind, FeedEntry, Landing, Queue, Run, Runner, Status, Task, TaskDetail, TaskEvent,
    TaskStatus, Train, Transition, Usage, Webhook,
};
use crate::time::rfc3339;

fn time_or_null(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |ms| Value::String(rfc3339(ms)))
}

/// A task, as `task list --json` prints each (and `task show --json` begins).
pub fn task(t: &Task) -> Value {
    json!({
        "id": t.id,
        "title": t.title,
        "description": t.description,
        "status": t.status.word(),
        "priority": t.priority,
        "patchset": t.patchset,
        "namespace": t.namespace,
        "depends_on": t.depends_on,
        "parent": t.parent,
        "failures": t.failures,
        "lost_leases": t.lost_leases,
        "cost_cents": t.cost_cents,
        "tokens": t.tokens,
        "backoff_until": time_or_null(t.backoff_until_ms),
        "feedback": t.feedback,
        "created_at": rfc3339(t.created_at_ms),
        "updated_at": rfc3339(t.updated_at_ms),
        "waiting_for": t.waiting_for,
        "requires": t.requires,
        "max_cost_cents": t.max_cost_cents,
        "paused": t.paused,
        "approval": t.approval,
        "epic": t.epic,
    })
}

/// One run of a task.
pub fn run(r: &Run) -> Value {
    json!({
        "id": r.id,
        "phase": r.phase.word(),
        "patchset": r.patchset,
        "attempt": r.attempt,
        "status": r.status.word(),
        "runner": r.runner,
        "cost_cents": r.cost_cents,
        "started_at": rfc3339(r.started_at_ms),
        "finished_at": time_or_null(r.finished_at_ms),
        "error": r.error,
        "failure_kind": r.failure_kind.map(FailureKind::word),
        "train": r.train,
        "builds": r.builds,
        "usage": r.usage.as_ref().map(usage),
    })
}

/// What a dev run's agent used.
pub fn usage(u: &Usage) -> Value {
    json!({
        "agent": u.agent,
        "model": u.model,
        "input_tokens": u.input_tokens,
        "cached_input_tokens": u.cached_input_tokens,
        "cache_write_tokens": u.cache_write_tokens,
        "output_tokens": u.output_tokens,
        "reasoning_tokens": u.reasoning_tokens,
        "cost_cents": u.cost_cents,
        "cost_source": u.cost_source.word(),
        "complete": u.complete,
    })
}

/// One entry of a task's history.
pub fn event(e: &TaskEvent) -> Value {
    json!({
        "at": rfc3339(e.at_ms),
        "kind": e.kind,
        "from": e.from.map(TaskStatus::word),
        "to": e.to.word(),
        "message": e.message,
    })
}

/// A task with its runs, history and children, as `task show --json` prints it.
pub fn task_detail(d: &TaskDetail) -> Value {
    let mut value = task(&d.task);
    value["runs"] = Value::Array(d.runs.iter().map(run).collect());
    value["events"] = Value::Array(d.events.iter().map(event).collect());
    value["children"] = Value::Array(
        d.children
            .iter()
            .map(|(id, status)| json!({"id": id, "status": status.word()}))
            .collect(),
    );
    value["children_cost_cents"] = json!(d.children_cost_cents);
    value["offered_commit"] = json!(d.offered_commit);
    value
}

/// Landing's state, as `status` and `queue` show it.
pub fn landing(l: &Landing, red_base: Option<&str>) -> Value {
    json!({"state": l.word(), "reason": l.reason(), "red_base": red_base})
}

/// The server's counts and health, as `status --json` prints them.
pub fn status(s: &Status) -> Value {
    json!({
        "open": s.open,
        "in_progress": s.in_progress,
        "verified": s.verified,
        "done": s.done,
        "needs_help": s.needs_help,
        "cancelled": s.cancelled,
        "active_dev_runs": s.active_dev_runs,
        "runners": s.runners,
        "base": s.base,
        "health": s.health.word(),
        "health_reason": s.health.reason(),
        "landing": landing(&s.landing, s.red_base.as_deref()),
        "queue_paused": s.queue_paused,
        "queue_pause_reason": s.queue_pause_reason,
        "queue_paused_since": s.queue_paused_at_ms.map(rfc3339),
        "builds_per_landed": s.builds_per_landed,
        "integration_depth": s.integration_depth,
        "integration_slots": s.integration_slots,
        "cost_cents_last_day": s.cost_cents_last_day,
        "tokens_last_day": s.tokens_last_day,
        "sandbox": s.sandbox,
        "webhooks": s.webhooks.iter().map(webhook).collect::<Vec<_>>(),
        "server": s.server.as_ref().map(|r| json!({
            "role": r.role,
            "term": r.term,
            "leader": r.leader,
        })),
    })
}

/// A webhook endpoint's deliveries, as `status --json` prints each.
pub fn webhook(w: &Webhook) -> Value {
    json!({
        "url": w.url,
        "position": w.position,
        "last_delivery": time_or_null(w.last_delivered_at_ms),
        "pending": w.pending.as_ref().map(|p| json!({
            "id": p.id,
            "type": p.kind,
            "attempts": p.attempts,
            "next_attempt": time_or_null(p.next_attempt_at_ms),
        })),
        "last_error": w.last_error,
        "last_error_at": time_or_null(w.last_error_at_ms),
    })
}

/// A train in flight, as `queue --json` prints each.
fn train(t: &Train) -> Value {
    json!({
        "id": t.id,
        "tasks": t.tasks,
        "step": t.step,
        "speculative": t.ahead.is_some(),
        "ahead": t.ahead,
        "runners": t.runners,
    })
}

/// The merge train now, the tasks in progress and the tasks behind them, as `queue --json` prints them.
pub fn queue(q: &Queue) -> Value {
    json!({
        "train": q.train.as_ref().map(train),
        "trains": q.trains.iter().map(train).collect::<Vec<_>>(),
        "running": q.running.iter().map(|r| json!({
            "id": r.id,
            "runner": r.runner,
            "since": rfc3339(r.since_ms),
        })).collect::<Vec<_>>(),
        "waiting": q.waiting.iter().map(|w| json!({
            "id": w.id,
            "status": w.status.word(),
            "position": w.position,
            "waiting_for": w.waiting_for,
            "eta_seconds": w.eta_seconds,
        })).collect::<Vec<_>>(),
        "landing": landing(&q.landing, q.red_base.as_deref()),
        "queue_paused": q.queue_paused,
        "queue_pause_reason": q.queue_pause_reason,
    })
}

/// One runner, as `runners --json` prints each.
pub fn runner(r: &Runner) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "state": r.state.word(),
        "slots_used": r.slots_used,
        "slots_total": r.slots_total,
        "last_heartbeat": time_or_null(r.last_heartbeat_ms),
        "labels": r.labels,
        "version": r.version,
        "health": r.health.word(),
        "health_reason": r.health.reason(),
        "sandbox": r.sandbox,
        "builds": r
            .builds
            .iter()
            .map(|b| json!({ "id": b.id, "commit": b.commit }))
            .collect::<Vec<_>>(),
    })
}

/// The runners, as `runners --json` prints them.
pub fn runners(runners: &[Runner]) -> Value {
    Value::Array(runners.iter().map(runner).collect())
}

/// One entry of the change feed, as `watch --all --json` prints each: `position`, `topic`,
/// `subject`, `kind`, `at` and `data` (its details, with its `message`).
pub fn feed_entry(e: &FeedEntry) -> Value {
    let mut data = e.data.clone();
    if let Value::Object(map) = &mut data {
        map.entry("message")
            .or_insert_with(|| e.message.clone().into());
    }
    json!({
        "position": e.position,
        "topic": e.topic,
        "subject": e.subject,
        "kind": e.kind,
        "at": rfc3339(e.at_ms),
        "data": data,
    })
}

/// One task transition, as `watch --json` prints each.
pub fn transition(t: &Transition) -> Value {
    json!({
        "at": rfc3339(t.at_ms),
        "task": t.task_id,
        "kind": t.kind,
        "from": t.from.map(TaskStatus::word),
        "to": t.to.word(),
        "message": t.message,
    })
}

/// `value` as `pipelinectl --json` prints it: pretty, two spaces.
pub fn pretty(value: &Value) -> String {
    // Serializing a `Value` cannot fail.
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}
