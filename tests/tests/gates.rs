//! What holds work back, end to end through the real binaries: a base that is itself red
//! (nobody is charged; leases and landing wait until it is green again), a person's hold on
//! landing alone (`queue pause --landing-only`), and the approval gate (`--require-approval`,
//! `task add --approval`, `task approve`, `task reject`).

use pipeline_tests::{Server, TestRepo, main_tip, runner};
use serde_json::Value;

/// Whether any of the task's `waiting_for` sentences contains `needle`.
fn waits_for(task: &Value, needle: &str) -> bool {
    task["waiting_for"].as_array().is_some_and(|w| {
        w.iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains(needle)))
    })
}

#[test]
fn a_landing_only_hold_lets_agents_work_and_lands_nothing_until_resumed() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let said = server
        .ctl(&[
            "queue",
            "pause",
            "--landing-only",
            "--reason",
            "release freeze",
        ])
        .ok();
    assert!(said.contains("landing held"), "{said}");
    assert_eq!(
        server
            .ctl(&["queue", "pause", "--landing", "--landing-only"])
            .code(),
        Some(2),
        "one or the other"
    );
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["landing"]["state"], "paused", "{status}");
    assert_eq!(status["landing"]["reason"], "release freeze");
    assert_eq!(status["queue_paused"], false, "leases go on: {status}");
    let tip = main_tip(&repo);
    let _r = runner(&repo, &server, "r");
    let ids: Vec<String> = (1..=2)
        .map(|i| server.add(&["--title", &format!("held {i}")]))
        .collect();
    // Agents keep working and their tasks reach verified, one after the other on one slot.
    for id in &ids {
        let t = server.wait_status(id, "verified");
        assert!(waits_for(&t, "landing is paused: release freeze"), "{t}");
    }
    let queue = server.ctl(&["queue", "--json"]).json();
    assert_eq!(queue["landing"]["state"], "paused", "{queue}");
    assert_eq!(
        queue["waiting"].as_array().map(Vec::len),
        Some(2),
        "{queue}"
    );
    assert_eq!(main_tip(&repo), tip, "nothing landed");
    // The hold outlives a restart, as the other pauses do.
    let addr = server.addr.clone();
    server.terminate();
    let server = Server::start(&repo, &["--listen", &addr]);
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["landing"]["reason"], "release freeze", "{status}");
    assert_eq!(status["verified"], 2, "{status}");
    assert_eq!(
        main_tip(&repo),
        tip,
        "nothing landed after the restart either"
    );
    server.ctl(&["queue", "resume"]).ok();
    for id in &ids {
        let t = server.wait_status(id, "done");
        assert_eq!(t["failures"], 0, "{t}");
    }
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["landing"]["state"], "running", "{status}");
}
