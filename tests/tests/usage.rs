//! Usage and cost accounting end to end: a runner's usage report (sent by the fake runner over
//! the real protocol) becomes its dev run's usage and cost in `task show`, counts in `status`'s
//! last-day figures (also after a restart), shapes the next assignment (the budget left under
//! `--max-task-cost`, the session to resume), and is refused whole when it is out of bounds.

use pipeline_proto::v1 as pb;
use pipeline_tests::fake_runner::{FakeRunner, complete_messages};
use pipeline_tests::{Server, TestRepo, fake_runner, runs};
use serde_json::{Value, json};

/// What a Claude Code run used, as a runner reports it.
fn claude_usage(cost_cents: f64, session: &str) -> pb::Usage {
    pb::Usage {
        agent: "claude".into(),
        model: Some("claude-sonnet-4-5".into()),
        input_tokens: 1000,
        cached_input_tokens: 800,
        cache_write_tokens: 50,
        output_tokens: 200,
        reasoning_tokens: 0,
        cost_cents,
        cost_source: pb::CostSource::Reported.into(),
        complete: true,
        session_id: Some(session.into()),
    }
}

/// A dev failure of `lease` costing `header_cost` cents by its header, with `usage`.
fn dev_failed(
    fake: &FakeRunner,
    lease: &pb::LeaseRef,
    header_cost: f64,
    usage: Option<pb::Usage>,
) -> Vec<pb::CompleteLeaseRequest> {
    let mut messages = complete_messages(
        &fake.id,
        lease.clone(),
        pb::LeaseOutcome::DevFailed,
        Some("the agent gave up".into()),
        header_cost,
        None,
        vec![],
    );
    if let Some(pb::complete_lease_request::Kind::Header(h)) = messages[0].kind.as_mut() {
        h.usage = usage;
    }
    messages
}

/// `status --json`'s last-day figures.
fn last_day(server: &Server) -> (Value, Value) {
    let s = server.ctl(&["status", "--json"]).json();
    (
        s["cost_cents_last_day"].clone(),
        s["tokens_last_day"].clone(),
    )
}

#[test]
fn a_usage_report_is_the_dev_runs_cost_counts_for_the_day_and_shapes_the_next_assignment() {
    let repo = TestRepo::new();
    let flags = ["--max-task-cost", "100", "--backoff-base", "0"];
    let server = Server::start(&repo, &flags);
    let mut fake = fake_runner(&repo, &server);
    let id = server.add(&["--title", "count what it costs"]);
    let first = fake.next_assignment();
    assert_eq!(
        (first.budget_cents, first.resume_session.as_deref()),
        (Some(100.0), None),
        "the whole cap, and no session yet"
    );
    let lease = first.lease.expect("lease");

    // Out of bounds, the report is refused whole, and nothing changes.
    for (usage, says) in [
        (
            pb::Usage {
                cost_cents: f64::NAN,
                ..claude_usage(30.0, "s")
            },
            "usage.cost_cents NaN is not a cost",
        ),
        (
            pb::Usage {
                model: Some("m".repeat(1 << 20)),
                ..claude_usage(30.0, "s")
            },
            "usage.model is 1048576 bytes; at most 200",
        ),
    ] {
        let err = fake
            .complete_raw(dev_failed(&fake, &lease, 1.0, Some(usage)))
            .expect_err(says);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{says}");
        assert!(err.message().starts_with(says), "{}", err.message());
        assert!(
            err.message().len() < 200,
            "a short refusal: {}",
            err.message()
        );
    }
    let task = server.show(&id);
    assert_eq!(task["status"], "in_progress");
    assert_eq!(task["cost_cents"], 0.0);
    let dev = &runs(&task)[0];
    assert_eq!(
        (&dev["status"], &dev["usage"]),
        (&json!("running"), &Value::Null)
    );
    assert_eq!(last_day(&server), (json!(0.0), json!(0)));

    // A report within bounds: its cents are the run's (not the header's), its figures the
    // run's usage.
    fake.complete_raw(dev_failed(
        &fake,
        &lease,
        1.0,
        Some(claude_usage(30.0, "sess-1")),
    ))
    .expect("a dev failure with its usage");
    let task = server.wait_status(&id, "in_progress");
    assert_eq!(task["cost_cents"], 30.0);
    let dev = &runs(&task)[0];
    assert_eq!(
        (&dev["status"], &dev["cost_cents"]),
        (&json!("failure"), &json!(30.0))
    );
    assert_eq!(
        dev["usage"],
        json!({
            "agent": "claude",
            "model": "claude-sonnet-4-5",
            "input_tokens": 1000,
            "cached_input_tokens": 800,
            "cache_write_tokens": 50,
            "output_tokens": 200,
            "reasoning_tokens": 0,
            "cost_cents": 30.0,
            "cost_source": "reported",
            "complete": true,
        })
    );
    assert_eq!(last_day(&server), (json!(30.0), json!(1200)));

    // The retry: the budget left, and the session to resume.
    let second = fake.next_assignment();
    assert_eq!(second.lease.as_ref().map(|l| l.epoch), Some(2));
    assert_eq!(
        (second.budget_cents, second.resume_session.as_deref()),
        (Some(70.0), Some("sess-1"))
    );
    // A runner that sends no report: the header's cents stand, the run has no usage.
    fake.complete_raw(dev_failed(
        &fake,
        second.lease.as_ref().expect("lease"),
        5.0,
        None,
    ))
    .expect("a dev failure without usage");
    let third = fake.next_assignment();
    assert_eq!(
        (third.budget_cents, third.resume_session.as_deref()),
        (Some(65.0), Some("sess-1")),
        "the latest session reported"
    );
    let all = runs(&server.show(&id));
    let dev_runs: Vec<&Value> = all.iter().filter(|r| r["phase"] == "dev").collect();
    assert_eq!(dev_runs[1]["cost_cents"], 5.0);
    assert_eq!(dev_runs[1]["usage"], Value::Null);
    assert_eq!(last_day(&server), (json!(35.0), json!(1200)));
    // The task's own totals, in its show and in a list.
    let shown = server.show(&id);
    assert_eq!(
        (shown["cost_cents"].clone(), shown["tokens"].clone()),
        (json!(35.0), json!(1200))
    );
    let listed = server.ctl(&["task", "list", "--json"]).json();
    let row = listed
        .as_array()
        .and_then(|l| l.iter().find(|t| t["id"] == id.as_str()).cloned())
        .expect("listed");
    assert_eq!(
        (row["cost_cents"].clone(), row["tokens"].clone()),
        (json!(35.0), json!(1200))
    );

    // What people read.
    let text = server.ctl(&["task", "show", &id]).ok();
    assert!(
        text.contains("usage:       1,000 in / 200 out tokens, 30 cents\n"),
        "{text}"
    );
    assert!(text.contains("1,000/200"), "{text}");
    let status = server.ctl(&["status"]).ok();
    assert!(
        status.contains("last day:        35 cents, 1,200 tokens"),
        "{status}"
    );

    // After a restart the figures come from the database.
    drop(fake);
    server.terminate();
    let server = Server::start(&repo, &flags);
    assert_eq!(last_day(&server), (json!(35.0), json!(1200)));
    let dev = &runs(&server.show(&id))[0];
    assert_eq!(dev["usage"]["input_tokens"], 1000);
}

#[test]
fn a_tasks_own_cap_overrides_the_servers_and_stops_it_when_spent() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--max-task-cost", "1000", "--backoff-base", "0"]);
    let epic = server.add(&["--title", "the epic", "--priority", "4"]);
    let id = server.add(&[
        "--title",
        "a cheap one",
        "--max-cost",
        "50",
        "--parent",
        &epic,
        "--priority",
        "0",
    ]);
    let mut fake = fake_runner(&repo, &server);
    let shown = server.show(&id);
    assert_eq!(shown["max_cost_cents"], 50.0);
    let text = server.ctl(&["task", "show", &id]).ok();
    assert!(
        text.contains("cost:        0 cents (its cap: 50 cents)"),
        "{text}"
    );
    let first = fake.next_assignment();
    assert_eq!(
        first.budget_cents,
        Some(50.0),
        "its own cap, not the server's 1000"
    );
    let lease = first.lease.expect("lease");
    fake.complete_raw(dev_failed(
        &fake,
        &lease,
        30.0,
        Some(claude_usage(30.0, "s1")),
    ))
    .expect("first failure");
    let second = fake.next_assignment();
    assert_eq!(second.budget_cents, Some(20.0), "what is left of its cap");
    let lease = second.lease.expect("lease");
    fake.complete_raw(dev_failed(
        &fake,
        &lease,
        30.0,
        Some(claude_usage(30.0, "s2")),
    ))
    .expect("second failure");
    let stopped = server.wait_status(&id, "needs_help");
    assert_eq!(stopped["cost_cents"], 60.0);
    // Its epic shows what its children cost together.
    assert_eq!(server.show(&epic)["children_cost_cents"], 60.0);
    assert_eq!(
        stopped["waiting_for"],
        json!([format!(
            "cost limit reached: 60 of 50 cents (pipelinectl task retry {id})"
        )])
    );
    // Out of bounds, refused with the reason; nothing created.
    for bad in ["0", "-5", "NaN", "1e12"] {
        server
            .ctl(&["task", "add", "--title", "x", "--max-cost", bad])
            .refused(2, "--max-cost");
    }
    let listed = server.ctl(&["task", "list", "--json"]).json();
    assert_eq!(listed.as_array().map(Vec::len), Some(2));
}
