//! What holds work back, end to end through the real binaries: a base that is itself red
//! (nobody is charged; leases and landing wait until it is green again), a person's hold on
//! landing alone (`queue pause --landing-only`), and the approval gate (`--require-approval`,
//! `task add --approval`, `task approve`, `task reject`).

use pipeline_tests::{
    Runner, Server, TestRepo, agent_args, as_strs, main_tip, runner, runs, wait_for,
};
use serde_json::Value;

/// The dev runs of a task, from its JSON.
fn dev_runs(task: &Value) -> usize {
    runs(task).iter().filter(|r| r["phase"] == "dev").count()
}

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

/// A verification (the server's, which runners run too) that fails while `broken.txt` is in
/// the tree and `fixed.txt` is not, saying so last; each server build records the commit it
/// built in `$AGENT_LOG_DIR/server-builds`.
const BROKEN_UNLESS_FIXED: &str = "case $PWD in */integration) git rev-parse HEAD >> \
     \"$AGENT_LOG_DIR/server-builds\";; esac; \
     if [ -e broken.txt ] && [ ! -e fixed.txt ]; then echo 'checking the tree'; \
     echo 'FAILED (failures=124): broken.txt breaks everything' >&2; exit 1; fi";

#[test]
fn a_red_base_charges_no_one_holds_leases_and_landing_and_lands_everything_once_fixed() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--test-cmd", BROKEN_UNLESS_FIXED]);
    // A person pushes a breaking commit to the base while tasks are queued.
    let broken = repo.push_to_main("broken.txt", "oops");
    let ids = ["b1", "b2", "b3"];
    for id in ids {
        server.add(&["--id", id, "--title", id]);
    }
    let _r = Runner::start(
        &repo,
        &server,
        "r",
        &as_strs(&agent_args(&["--slots", "2"])),
    );
    let status = wait_for("leases and landing to pause on the red base", || {
        for id in ids {
            let t = server.show(id);
            assert_eq!(t["failures"], 0, "charged for the red base: {t}");
        }
        let s = server.ctl(&["status", "--json"]).json();
        (s["landing"]["red_base"] == broken.as_str()).then_some(s)
    });
    assert_eq!(status["landing"]["state"], "paused", "{status}");
    let reason = status["landing"]["reason"].as_str().expect("a reason");
    assert!(reason.contains(&broken), "names the base commit: {reason}");
    assert!(
        reason.contains("FAILED (failures=124): broken.txt breaks everything"),
        "the failing output: {reason}"
    );
    assert_eq!(status["queue_paused"], true, "leases wait too: {status}");
    let text = server.ctl(&["status"]).ok();
    assert!(
        text.contains(&format!("PAUSED while the base is red at {broken}")),
        "{text}"
    );
    // Whatever ran on the red base is kept, verified and uncharged, and nothing else starts.
    wait_for("every task that ran on the red base to settle", || {
        ids.iter()
            .all(|id| {
                let t = server.show(id);
                t["status"] == "verified" || t["status"] == "open"
            })
            .then_some(())
    });
    let late = server.add(&["--id", "b4", "--title", "b4"]);
    for id in ids.iter().copied().chain([late.as_str()]) {
        let t = server.show(id);
        assert_eq!(t["failures"], 0, "nobody is charged: {t}");
        match t["status"].as_str() {
            Some("verified") => {
                assert!(waits_for(&t, "landing is paused: the base main at"), "{t}");
                let kinds = pipeline_tests::event_kinds(&t);
                assert!(kinds.contains(&"base_red".to_owned()), "{kinds:?}");
            }
            _ => assert!(waits_for(&t, "no new leases while the base is red"), "{t}"),
        }
    }
    let explained = server.ctl(&["explain", "b1"]).ok();
    assert!(explained.contains(&broken), "{explained}");
    let queue = server.ctl(&["queue", "--json"]).json();
    assert_eq!(queue["landing"]["red_base"], broken.as_str(), "{queue}");
    assert_eq!(main_tip(&repo), broken, "nothing landed on the red base");
    let builds = repo.agent_file("server-builds").unwrap_or_default();
    assert_eq!(
        builds.lines().filter(|c| *c == broken).count(),
        1,
        "the server built the red base once: {builds}"
    );
    // A person pushes a fix: everything lands, each task after one dev run.
    repo.push_to_main("fixed.txt", "fixed");
    for id in ids.iter().copied().chain([late.as_str()]) {
        let t = server.wait_status(id, "done");
        assert_eq!(t["failures"], 0, "{t}");
        assert_eq!(dev_runs(&t), 1, "the commit was kept, not redone: {t}");
    }
    let mut landed = repo.landed();
    landed.sort();
    assert_eq!(landed, ["b1", "b2", "b3", "b4"]);
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["landing"]["state"], "running", "{status}");
    assert_eq!(status["queue_paused"], false, "{status}");
}

/// Whether the task's history has an entry of `kind` whose message contains `says`.
fn history_says(task: &Value, kind: &str, says: &str) -> bool {
    task["events"].as_array().is_some_and(|e| {
        e.iter()
            .any(|e| e["kind"] == kind && e["message"].as_str().is_some_and(|m| m.contains(says)))
    })
}

#[test]
fn with_require_approval_a_verified_task_lands_only_once_a_person_approves_it() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--require-approval", "--backoff-base", "0"]);
    let _r = runner(&repo, &server, "r");
    let tip = main_tip(&repo);
    let a = server.add(&["--title", "approve me"]);
    let b = server.add(&["--title", "reject me"]);
    for id in [&a, &b] {
        let t = server.wait_status(id, "verified");
        assert_eq!(t["approval"], "required", "{t}");
        assert!(
            waits_for(&t, &format!("pipelinectl task approve {id}")),
            "{t}"
        );
    }
    let queue = server.ctl(&["queue", "--json"]).json();
    let waiting = queue["waiting"].as_array().cloned().unwrap_or_default();
    assert_eq!(waiting.len(), 2, "{queue}");
    assert!(
        waiting.iter().all(|w| w["eta_seconds"].is_null()
            && w["waiting_for"].as_array().is_some_and(|r| r
                .iter()
                .any(|r| r.as_str().is_some_and(|r| r.contains("approval"))))),
        "{queue}"
    );
    let explained = server.ctl(&["explain", &a]).ok();
    assert!(explained.contains("approval"), "{explained}");
    assert_eq!(main_tip(&repo), tip, "nothing lands unapproved");
    // Refusals: an unknown task, a task that is not verified, a reject without a note.
    server
        .ctl(&["task", "approve", "nope"])
        .refused(3, "task nope does not exist");
    let open = server.add(&["--title", "not yet", "--description", "MODE: wait"]);
    repo.wait_agent(&open);
    server
        .ctl(&["task", "approve", &open])
        .refused(4, "only a verified task waits for approval");
    repo.release_agents();
    server.wait_status(&open, "verified");
    assert_eq!(
        server.ctl(&["task", "reject", &b]).code(),
        Some(2),
        "--note is required"
    );
    // Approved: it lands, and its history says who approved it and why.
    let said = server
        .ctl(&[
            "task",
            "approve",
            &a,
            "--note",
            "reviewed the diff",
            "--by",
            "alice",
        ])
        .ok();
    assert!(said.contains("approved"), "{said}");
    let done = server.wait_status(&a, "done");
    assert_eq!(done["approval"], "approved", "{done}");
    assert!(
        history_says(&done, "approved", "alice")
            && history_says(&done, "approved", "reviewed the diff"),
        "{done}"
    );
    // The train that landed it was formed while the other was verified too, and left it out.
    let t = server.show(&b);
    assert_eq!(t["status"], "verified", "{t}");
    assert_eq!(repo.landed(), [a.as_str()]);
    server
        .ctl(&["task", "approve", &a])
        .refused(4, "cannot approve a task that is done");
    // Rejected: back to open, charged, with the note in the next prompt; the agent amends its
    // commit and the new patchset waits for approval again.
    server
        .ctl(&["task", "reject", &b, "--note", "use the other parser"])
        .ok();
    let again = server.wait_task(&b, "verified again", |t| {
        t["status"] == "verified" && t["patchset"] == 2
    });
    assert_eq!(
        again["failures"], 1,
        "a rejection is a failed attempt: {again}"
    );
    assert_eq!(again["approval"], "required", "{again}");
    assert!(
        history_says(&again, "rejected", "use the other parser"),
        "{again}"
    );
    let prompt = repo
        .agent_file(&format!("dev-{b}-2.prompt"))
        .expect("the second prompt");
    assert!(prompt.contains("use the other parser"), "{prompt}");
    assert!(prompt.contains("git commit --amend"), "{prompt}");
    // An approval is part of the task's state: it outlives a restart.
    server.ctl(&["queue", "pause", "--landing-only"]).ok();
    server.ctl(&["task", "approve", &b]).ok();
    let addr = server.addr.clone();
    server.terminate();
    let server = Server::start(
        &repo,
        &[
            "--require-approval",
            "--backoff-base",
            "0",
            "--listen",
            &addr,
        ],
    );
    assert_eq!(server.show(&b)["approval"], "approved");
    server.ctl(&["queue", "resume"]).ok();
    let done = server.wait_status(&b, "done");
    assert_eq!(done["failures"], 1, "{done}");
    assert_eq!(
        server.show(&open)["status"],
        "verified",
        "never approved, never landed"
    );
}

#[test]
fn a_task_added_with_approval_waits_for_it_alone() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let gated = server.add(&["--title", "gated", "--approval"]);
    let file = repo.dir.path().join("tasks.jsonl");
    std::fs::write(
        &file,
        "{\"title\": \"gated too\", \"approval\": true}\n{\"title\": \"free\"}\n",
    )
    .expect("write");
    let listed = server
        .ctl(&["task", "add", "--from-file", file.to_str().expect("utf-8")])
        .ok();
    let ids: Vec<&str> = listed.lines().collect();
    let (gated_too, free) = (ids[0].to_owned(), ids[1].to_owned());
    let _r = runner(&repo, &server, "r");
    let t = server.wait_status(&free, "done");
    assert_eq!(t["approval"], Value::Null, "{t}");
    for id in [&gated, &gated_too] {
        let t = server.wait_status(id, "verified");
        assert_eq!(t["approval"], "required", "{t}");
    }
    let list = server.ctl(&["task", "list", "--json"]).json();
    assert!(
        list.as_array().is_some_and(|l| l
            .iter()
            .any(|t| t["id"] == gated.as_str() && t["approval"] == "required")),
        "{list}"
    );
    server.ctl(&["task", "approve", &gated]).ok();
    server.wait_status(&gated, "done");
    assert_eq!(server.show(&gated_too)["status"], "verified");
    assert!(!repo.landed().contains(&gated_too));
}

#[test]
fn under_bild_a_base_red_for_the_tasks_namespace_charges_no_one() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _r = Runner::start(&repo, &server, "r", &as_strs(&agent_args(&[])));
    // `needs-base-fix` fails on every tree until a file base-fixed is in it: the base too.
    let id = server.add(&["--title", "on a red base", "--namespace", "needs-base-fix"]);
    let status = wait_for("the base to be found red for the namespace", || {
        let s = server.ctl(&["status", "--json"]).json();
        s["landing"]["red_base"].is_string().then_some(s)
    });
    let reason = status["landing"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("needs-base-fix") && reason.contains("the base is broken"),
        "{reason}"
    );
    let t = server.wait_status(&id, "verified");
    assert_eq!(t["failures"], 0, "{t}");
    let calls = repo.agent_file("bild.calls").unwrap_or_default();
    assert!(
        calls.lines().any(|c| c == "test=0 needs-base-fix"),
        "the server built the base for the task's namespace: {calls}"
    );
    repo.push_to_main("base-fixed", "yes\n");
    let done = server.wait_status(&id, "done");
    assert_eq!(done["failures"], 0, "{done}");
    assert_eq!(dev_runs(&done), 1, "{done}");
}
