//! Run logs and `watch` end to end: live, complete, in order, resumable, capped.

use std::process::Stdio;

use pipeline_tests::{Server, TestRepo, runner, wait_for};
use serde_json::Value;

/// `pipelinectl logs ID --follow` in the background, its stdout collected to a file.
struct Follower {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl Follower {
    fn start(repo: &TestRepo, server: &Server, id: &str, name: &str) -> Self {
        let out = repo.dir.path().join(format!("follow-{name}.out"));
        let file = std::fs::File::create(&out).expect("out file");
        let child = server
            .ctl_command()
            .args(["logs", id, "--follow"])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn follower");
        Self { child, out }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits for the follower to exit by itself (the task is over); returns what it printed.
    fn finish(mut self) -> String {
        let status = wait_for("the follower to exit", || {
            self.child.try_wait().ok().flatten()
        });
        assert!(status.success(), "follower exit: {status:?}");
        self.text()
    }
}

/// The agent's "line i of N" lines, in the order printed.
fn agent_lines(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.contains(" stdout ") && l.contains("line "))
        .map(|l| {
            l.split(" stdout ")
                .nth(1)
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .collect()
}

fn expected(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("line {i} of {n}")).collect()
}

#[test]
fn followers_before_during_and_after_a_run_each_see_every_line_once_in_order() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let id = server.add(&[
        "--title",
        "chatty",
        "--description",
        "MODE: chatty-wait\nLINES: 400",
    ]);
    // Before the run: no runner yet.
    let before = Follower::start(&repo, &server, &id, "before");
    let _r = runner(&repo, &server, "r");
    wait_for("the first half", || {
        before.text().contains("line 200 of 400").then_some(())
    });
    // During the run: two more.
    let during = Follower::start(&repo, &server, &id, "during");
    let during2 = Follower::start(&repo, &server, &id, "during2");
    wait_for("the late followers to catch up", || {
        (during.text().contains("line 200 of 400") && during2.text().contains("line 200 of 400"))
            .then_some(())
    });
    repo.release_agents();
    let outs = [before.finish(), during.finish(), during2.finish()];
    server.wait_status(&id, "done");
    // After the run: a plain `logs` and a follower of a finished task.
    let after = server.ctl(&["logs", &id]).ok();
    let after_follow = Follower::start(&repo, &server, &id, "after").finish();
    for out in outs.iter().chain([&after, &after_follow]) {
        assert_eq!(agent_lines(out), expected(400), "{out}");
        for header in [
            "=== dev · attempt 1 · r ===",
            "=== verify · attempt 1 · r ===",
            "=== integrate · attempt 1 · server ===",
        ] {
            assert_eq!(out.matches(header).count(), 1, "{header} in:\n{out}");
        }
        for note in [
            "runner leased",
            "runner agent exited 0 after",
            "server landed on main",
        ] {
            assert!(out.contains(note), "{note} in:\n{out}");
        }
    }
    assert_eq!(
        outs[0], after,
        "the live follower saw exactly what is stored"
    );
}

#[test]
fn a_runner_that_loses_the_server_mid_run_leaves_a_complete_log() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--lease-ttl", "10"]);
    let addr = server.addr.clone();
    let _r = runner(&repo, &server, "r");
    let id = server.add(&[
        "--title",
        "cut off",
        "--description",
        "MODE: chatty-wait\nLINES: 1000",
    ]);
    wait_for("the first half to be stored", || {
        server
            .ctl(&["logs", &id])
            .ok()
            .contains("line 500 of 1000")
            .then_some(())
    });
    server.kill();
    // The second half is printed while the server is away: the runner keeps it.
    repo.release_agents();
    wait_for("the agent to finish", || {
        repo.agent_file(&format!("{id}.attempts")).and_then(|_| {
            (!repo
                .dir
                .path()
                .join("runners/r/slots/0/scratch.txt")
                .exists())
            .then_some(())
        })
    });
    let server = Server::start(&repo, &["--lease-ttl", "10", "--listen", &addr]);
    server.wait_status(&id, "done");
    let log = server.ctl(&["logs", &id]).ok();
    let lines = agent_lines(&log);
    assert_eq!(lines.len(), 1000, "every line, once: {:?}", lines.last());
    assert!(lines == expected(1000), "in order");
    assert!(!log.contains("cut"), "nothing lost");
}

#[test]
fn watch_shows_every_transition_of_a_task_through_a_failure_and_a_retry() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--backoff-base", "0"]);
    let out = repo.dir.path().join("watch.out");
    let mut watch = server
        .ctl_command()
        .args(["watch", "--json"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("out"))
        .spawn()
        .expect("spawn watch");
    let _r = runner(&repo, &server, "r");
    // `watch` is connected once it shows a transition made after it started.
    let probe = server.add(&["--title", "probe", "--description", "MODE: nocommit"]);
    wait_for("watch to be connected", || {
        std::fs::read_to_string(&out)
            .ok()?
            .contains(&format!("\"task\":\"{probe}\""))
            .then_some(())
    });
    let id = server.add(&["--title", "flaky", "--description", "MODE: fail-once"]);
    server.wait_status(&id, "done");
    let mine = || -> Vec<Value> {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["task"] == id.as_str())
            .collect()
    };
    let events = wait_for("the done transition", || {
        let e = mine();
        e.iter().any(|v| v["to"] == "done").then_some(e)
    });
    let shape: Vec<(String, String, String)> = events
        .iter()
        .map(|v| {
            (
                v["kind"].as_str().unwrap_or_default().to_owned(),
                v["from"].as_str().unwrap_or("-").to_owned(),
                v["to"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expect = [
        ("created", "-", "open"),
        ("leased", "open", "in_progress"),
        ("dev_failed", "in_progress", "open"),
        ("leased", "open", "in_progress"),
        ("verified", "in_progress", "verified"),
        ("integrated", "verified", "done"),
    ]
    .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()));
    assert_eq!(shape, expect);
    assert!(
        events
            .iter()
            .all(|v| v["at"].is_string() && v["message"].is_string())
    );
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn long_lines_are_cut_and_a_run_past_its_cap_keeps_head_and_tail() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--log-cap-bytes", "8192"]);
    let _r = runner(&repo, &server, "r");
    let long = server.add(&["--title", "long", "--description", "MODE: longline"]);
    server.wait_status(&long, "done");
    let log = server.ctl(&["logs", &long]).ok();
    let line = log
        .lines()
        .find(|l| l.contains("xxxx"))
        .expect("the long line");
    assert!(line.len() < 66_000, "cut to 64 KiB: {}", line.len());
    assert!(
        line.ends_with("more bytes]"),
        "{}",
        &line[line.len() - 40..]
    );

    let big = server.add(&[
        "--title",
        "big",
        "--description",
        "MODE: chatty\nLINES: 3000",
    ]);
    server.wait_status(&big, "done");
    let log = server.ctl(&["logs", &big]).ok();
    let lines = agent_lines(&log);
    assert!(lines.len() < 1000, "capped: {} lines kept", lines.len());
    assert_eq!(
        lines.first().map(String::as_str),
        Some("line 1 of 3000"),
        "head kept"
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("line 3000 of 3000"),
        "tail kept"
    );
    assert!(
        log.contains("cut: the run's log passed its size cap"),
        "a marker between: {log}"
    );
}

#[test]
fn logs_of_an_unknown_or_invalid_task_are_refused() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    server
        .ctl(&["logs", "nope"])
        .refused(3, "task nope does not exist");
    server
        .ctl(&["logs", "../x", "--follow"])
        .refused(2, "invalid task id");
    let id = server.add(&["--title", "no runs yet"]);
    assert_eq!(server.ctl(&["logs", &id]).ok(), "", "no runs, no lines");
}
