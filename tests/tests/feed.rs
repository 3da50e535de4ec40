//! The change feed end to end: `pipelinectl watch --all --json` follows runners (registered,
//! connected, drained, disconnected), the queue and landing (paused, resumed), a train
//! (formed, its steps, ended) and a task's transitions, each entry once with a position that
//! only grows; after a server restart `--after` goes on from the last position seen without
//! skipping an entry; `--kind` keeps one topic. Every wait is on an entry of the feed.

use pipeline_tests::{Server, TestRepo, runner};
use serde_json::Value;

fn positions(entries: &[Value]) -> Vec<i64> {
    entries
        .iter()
        .map(|e| e["position"].as_i64().expect("a position"))
        .collect()
}

/// Positions only grow, none is seen twice.
fn assert_increasing(entries: &[Value]) {
    let p = positions(entries);
    assert!(
        p.windows(2).all(|w| w[0] < w[1]),
        "positions out of order or repeated: {p:?}"
    );
}

#[test]
fn watch_all_follows_runners_the_queue_landing_trains_and_tasks_and_resumes_after_a_restart() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let watch = server.feed();
    let runners = server.feed_with(&["--kind", "runner"]);

    // A runner registers and connects.
    let r1 = runner(&repo, &server, "r1");
    let registered = watch.wait_kind("runner", "r1", "registered");
    assert!(registered["data"]["slots"].is_u64(), "{registered}");
    watch.wait_kind("runner", "r1", "connected");

    // The queue and landing paused and resumed.
    server
        .ctl(&["queue", "pause", "--landing", "--reason", "lunch"])
        .ok();
    let paused = watch.wait_kind("queue", "queue", "paused");
    assert_eq!(paused["data"]["reason"], "lunch", "{paused}");
    let landing = watch.wait_kind("landing", "landing", "paused");
    assert_eq!(landing["data"]["state"], "paused", "{landing}");
    // A task added meanwhile waits; it is in the feed at once.
    let id = server.add(&["--title", "followed"]);
    watch.wait(&format!("{id} created"), |e| {
        e["topic"] == "task" && e["subject"] == id.as_str() && e["kind"] == "created"
    });
    server.ctl(&["queue", "resume"]).ok();
    watch.wait_kind("queue", "queue", "resumed");
    let resumed = watch.wait_kind("landing", "landing", "resumed");
    assert_eq!(resumed["data"]["state"], "running", "{resumed}");

    // The task is leased, verified and lands in a train: its transitions and the train's
    // formation, steps and end, in that order.
    let done = watch.wait(&format!("{id} done"), |e| {
        e["topic"] == "task" && e["subject"] == id.as_str() && e["data"]["status"] == "done"
    });
    let formed = watch.wait("a train formed", |e| {
        e["topic"] == "train" && e["kind"] == "formed"
    });
    assert_eq!(formed["data"]["tasks"], serde_json::json!([id]), "{formed}");
    let train = formed["subject"]
        .as_str()
        .expect("the train's ID")
        .to_owned();
    watch.wait_kind("train", &train, "step");
    let ended = watch.wait_kind("train", &train, "ended");
    assert_eq!(ended["data"]["outcome"], "landed", "{ended}");
    assert_eq!(ended["data"]["landed"], 1, "{ended}");
    let entries = watch.entries();
    assert_increasing(&entries);
    let task_kinds: Vec<&str> = entries
        .iter()
        .filter(|e| e["topic"] == "task" && e["subject"] == id.as_str())
        .map(|e| e["data"]["status"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        task_kinds,
        ["open", "in_progress", "verified", "done"],
        "{entries:?}"
    );
    let at = |e: &Value| e["position"].as_i64().expect("position");
    assert!(
        at(&formed) < at(&done),
        "formed before it lands: {entries:?}"
    );
    // Each entry carries its time and its message.
    assert!(
        done["at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{done}"
    );
    assert!(done["data"]["message"].is_string(), "{done}");

    // Drained from the control plane.
    server.ctl(&["runners", "drain", "r1"]).ok();
    watch.wait_kind("runner", "r1", "drained");
    let last_seen = at(entries.last().expect("entries"));

    // The server restarts: the runner disconnects (recorded as it happens), reconnects; a
    // watch resumed with --after from the last position it saw skips nothing and repeats
    // nothing.
    drop(r1);
    watch.wait_kind("runner", "r1", "disconnected");
    let before_restart = watch.entries();
    let last_before = at(before_restart.last().expect("entries"));
    drop(watch);
    server.terminate();
    let server = Server::start(&repo, &[]);
    let resumed = server.feed_after(last_seen);
    let _r1 = runner(&repo, &server, "r1");
    resumed.wait_kind("runner", "r1", "connected");
    let after = resumed.entries();
    assert_increasing(&after);
    assert!(at(&after[0]) > last_seen, "{after:?}");
    // What the first watch saw after `last_seen` comes again, in the same order, first.
    let missed: Vec<&Value> = before_restart
        .iter()
        .filter(|e| at(e) > last_seen)
        .collect();
    assert!(!missed.is_empty(), "the disconnection at least");
    for (seen, again) in missed.iter().zip(&after) {
        assert_eq!(*seen, again, "resumed in order, nothing skipped");
    }
    assert!(
        after.iter().any(|e| at(e) > last_before),
        "and then what came after the restart: {after:?}"
    );

    // --kind runner saw runner entries only, in order.
    let only = runners.entries();
    assert!(only.iter().all(|e| e["topic"] == "runner"), "{only:?}");
    assert_increasing(&only);
    let kinds: Vec<&str> = only.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.starts_with(&["registered", "connected"]), "{kinds:?}");
}

#[test]
fn watch_refuses_after_without_all_and_an_unknown_kind() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    server
        .ctl(&["watch", "--after", "3"])
        .refused(2, "--after goes with --all or --kind");
    let out = server.ctl(&["watch", "--kind", "weather"]);
    assert_eq!(out.code(), Some(2), "a usage error");
}
