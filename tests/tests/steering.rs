//! Steering end to end: `task retry --note/--fresh`, `explain`, `watch` filters, the `logs`
//! options (`--tail`, `--since`, `--run`, and `--follow` across a server restart), and the
//! prompt (`--prompt-template`, the project's `AGENTS.md`, the verification it names).
//!
//! Lines read on purpose: what `watch` and `logs --follow` print (the feature itself, read
//! through the captured stream), their "waiting for it" while the server is down (the
//! operator's only sign that they wait instead of giving up), and `--exit-when-idle`'s last
//! word on why the server stopped.

use std::process::Command;

use pipeline_tests::{
    Proc, Runner, Server, TestRepo, agent_args, as_strs, bin, event_kinds, runner, runs,
    scripts_path, wait_for,
};
use serde_json::Value;

/// `pipelinectl ARGS` in the background, its stdout captured with its stderr.
fn ctl_in_background(server_url: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new("sh");
    pipeline_tests::isolate(&mut cmd, &pipeline_tests::home_for(server_url))
        .arg("-c")
        .arg("exec \"$0\" \"$@\" 1>&2")
        .arg(bin("pipelinectl"))
        .args(["--server", server_url])
        .args(args)
        .env("PATH", scripts_path())
        .env_remove("PIPELINE_SERVER")
        .env_remove("PIPELINE_TOKEN");
    Proc::spawn(&mut cmd)
}

#[test]
fn a_retry_with_a_note_reaches_the_next_prompt_and_fresh_starts_from_the_base() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--max-retries", "1"]);
    let _r = runner(&repo, &server, "r");
    let id = server.add(&["--title", "t", "--description", "MODE: fail-once"]);
    server.wait_status(&id, "needs_help");
    let explained = server.ctl(&["explain", &id]).ok();
    assert!(
        explained.contains(&format!(
            "{id} (t) needs help: it stopped after 1 failed attempt (pipelinectl task retry {id} to go on)."
        )),
        "{explained}"
    );
    assert!(
        explained.contains("It waits: retry limit reached"),
        "{explained}"
    );
    server
        .ctl(&[
            "task",
            "retry",
            &id,
            "--note",
            "look at notes/ first",
            "--fresh",
        ])
        .ok();
    let task = server.wait_status(&id, "done");
    let prompt = repo
        .agent_file(&format!("dev-{id}-2.prompt"))
        .expect("prompt");
    assert!(
        prompt.contains("## Guidance from a person\nlook at notes/ first\n"),
        "{prompt}"
    );
    assert!(event_kinds(&task).contains(&"retried".to_owned()));
    let retried = task["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["kind"] == "retried").cloned())
        .unwrap_or(Value::Null);
    let message = retried["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("starting fresh") && message.contains("with a note"),
        "{message}"
    );
    let done = server.ctl(&["explain", &id]).ok();
    assert!(
        done.contains("is done: its commit is on the base."),
        "{done}"
    );
    server
        .ctl(&["explain", "no-such-task"])
        .refused(3, "no-such-task");
}

#[test]
fn logs_take_tail_since_and_run() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _r = runner(&repo, &server, "r");
    let id = server.add(&["--title", "t", "--description", "MODE: chatty\nLINES: 50"]);
    server.wait_status(&id, "done");
    let all = server.ctl(&["logs", &id]).ok();
    assert!(all.contains("line 1 of 50"), "{all}");
    let tail = server.ctl(&["logs", &id, "--tail", "3"]).ok();
    let lines: Vec<&str> = tail.lines().filter(|l| !l.starts_with("===")).collect();
    assert_eq!(lines.len(), 3, "{tail}");
    assert!(!tail.contains("line 1 of 50"), "{tail}");
    assert!(
        all.ends_with(&format!("{}\n", lines[2])),
        "the last line of all: {tail}"
    );
    // An attempt it has not had is said so, not printed as nothing.
    server.ctl(&["logs", &id, "--run", "2"]).refused(
        3,
        &format!("task {id} has no attempt 2: its attempts are 1 to 1"),
    );
    let first = server.ctl(&["logs", &id, "--run", "1"]).ok();
    assert_eq!(first, all, "attempt 1 is everything");
    assert_eq!(server.ctl(&["logs", &id, "--since", "1h"]).ok(), all);
    let bad = server.ctl(&["logs", &id, "--since", "soon"]);
    assert_eq!(bad.code(), Some(2), "{}", bad.stderr);
    assert!(
        bad.stderr.contains("write it like 90s, 10m, 2h or 1d"),
        "{}",
        bad.stderr
    );
}

#[test]
fn watch_filters_by_task_and_status() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _r = runner(&repo, &server, "r");
    let watched = server.add(&["--title", "watched", "--description", "MODE: wait"]);
    let watch = ctl_in_background(
        &server.url,
        &["watch", "--task", &watched, "--status", "done", "--json"],
    );
    repo.wait_agent(&watched);
    let other = server.add(&["--title", "other"]);
    repo.release_agents();
    server.wait_status(&watched, "done");
    server.wait_status(&other, "done");
    let line = watch.wait_for_line("\"to\"").expect("a transition");
    let seen: Value = serde_json::from_str(&line).expect("json");
    assert_eq!(seen["task"], watched.as_str(), "{line}");
    assert_eq!(seen["to"], "done");
    assert!(
        !watch.log().contains(&format!("\"{other}\"")),
        "the other task is filtered out: {}",
        watch.log()
    );
    server
        .ctl(&["watch", "--task", "ghost"])
        .refused(3, "ghost");
}

#[test]
fn watch_waits_for_a_restarted_server_and_goes_on_where_it_was() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let addr = server.addr.clone();
    let before = server.add(&["--title", "before the watch"]);
    let watch = ctl_in_background(&server.url, &["watch"]);
    // Tasks created until the watch (started in the background) shows one: from then on it
    // is connected.
    let mut created = Vec::new();
    let first = wait_for("the watch to show a task created after it started", || {
        if let Some(seen) = created
            .iter()
            .find(|id| watch.log().contains(&format!(" {id} - -> open (created)")))
        {
            return Some(String::clone(seen));
        }
        created.push(server.add(&["--title", "while watching"]));
        None
    });
    server.kill();
    watch
        .wait_for_line("waiting for it")
        .expect("says it waits for the server");
    // What happens before the watch reconnects is not lost: it comes first, once.
    let server = Server::start(&repo, &["--listen", &addr]);
    let during = server.add(&["--title", "while it was away"]);
    server.ctl(&["task", "cancel", &during]).ok();
    watch
        .wait_for_line(&format!("{during} open -> cancelled (cancelled)"))
        .expect("the transitions after the restart");
    let log = watch.log();
    for (id, times) in [(&before, 0), (&first, 1), (&during, 2)] {
        assert_eq!(
            log.lines()
                .filter(|l| l.contains(&format!(" {id} ")))
                .count(),
            times,
            "{id}: {log}"
        );
    }
}

#[test]
fn logs_follow_waits_for_a_restarted_server_and_prints_each_line_once() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--lease-ttl", "10"]);
    let addr = server.addr.clone();
    let _r = runner(&repo, &server, "r");
    let id = server.add(&[
        "--title",
        "t",
        "--description",
        "MODE: chatty-wait\nLINES: 20",
    ]);
    repo.wait_agent(&id);
    let follow = ctl_in_background(&server.url, &["logs", &id, "--follow"]);
    follow
        .wait_for_line("line 10 of 20")
        .expect("the first half");
    server.kill();
    follow
        .wait_for_line("waiting for it")
        .expect("says it waits for the server");
    let server = Server::start(&repo, &["--lease-ttl", "10", "--listen", &addr]);
    repo.release_agents();
    server.wait_status(&id, "done");
    let mut follow = follow;
    let status = follow.wait_exit();
    assert!(status.success(), "{}", follow.log());
    let log = follow.log();
    for i in 1..=20 {
        let line = format!("line {i} of 20");
        assert_eq!(
            log.matches(&format!(" {line}\n")).count() + usize::from(log.ends_with(&line)),
            1,
            "{line} once: {log}"
        );
    }
}

/// Adds tasks to a server with no runner, then stops it: the queue is left for a later run.
fn queue_up(repo: &TestRepo, tasks: &[&[&str]]) -> Vec<String> {
    let server = Server::start(repo, &[]);
    let ids = tasks.iter().map(|t| server.add(t)).collect();
    assert!(server.terminate().success());
    ids
}

fn local_runner_flags() -> Vec<String> {
    let mut flags = vec!["--local-runners".to_owned(), "1".to_owned()];
    flags.extend(pipeline_tests::agent_args(&["--no-verify"]));
    flags
}

#[test]
fn exit_when_idle_works_the_queue_off_then_stops_and_says_if_a_task_needs_help() {
    let repo = TestRepo::new();
    let ids = queue_up(&repo, &[&["--title", "one"], &["--title", "two"]]);
    let mut flags = local_runner_flags();
    flags.push("--exit-when-idle".into());
    let mut server = Server::spawn(&mut Server::command(
        &repo,
        &flags.iter().map(String::as_str).collect::<Vec<_>>(),
    ))
    .expect("server");
    // The whole log: the reader thread may still hold its last lines when the process ends.
    let (status, log) = server.proc.wait_exit_log();
    assert!(status.success(), "exit 0 once idle: {log}");
    assert!(
        log.contains("no task can make progress; stopping (--exit-when-idle)"),
        "{log}"
    );
    let mut landed = repo.landed();
    landed.sort();
    assert_eq!(landed, ids, "both landed before it stopped");

    // A task that fails for good: the run ends idle, with exit 1.
    let repo = TestRepo::new();
    queue_up(&repo, &[&["--title", "bad", "--description", "MODE: fail"]]);
    flags.extend(["--max-retries".into(), "1".into()]);
    let mut server = Server::spawn(&mut Server::command(
        &repo,
        &flags.iter().map(String::as_str).collect::<Vec<_>>(),
    ))
    .expect("server");
    let (status, log) = server.proc.wait_exit_log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("idle, and 1 task(s) need help"), "{log}");
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let repo = TestRepo::new();
    let ids = queue_up(
        &repo,
        &[
            &["--title", "later", "--priority", "3"],
            &["--title", "first", "--priority", "0"],
        ],
    );
    // Everything the database holds (SQLite's or PostgreSQL's: pipeline_tests::database).
    let before = repo.database_dump();
    // On SQLite, to the byte: not even a page is rewritten.
    let file = repo.state_dir().join("pipeline.db");
    let file_before = (!repo.on_postgres()).then(|| std::fs::read(&file).expect("db"));
    let out = pipeline_tests::run(
        Server::command(&repo, &["--dry-run"]).stdout(std::process::Stdio::piped()),
    );
    let text = out.ok();
    assert!(
        text.starts_with("dry run: nothing is leased, landed or written\n"),
        "{text}"
    );
    let first = text
        .find(&format!("1. {}  P0  first", ids[1]))
        .expect(&text);
    let later = text
        .find(&format!("2. {}  P3  later", ids[0]))
        .expect(&text);
    assert!(first < later, "{text}");
    assert!(
        text.contains("would land: nothing (no task is verified)"),
        "{text}"
    );
    assert_eq!(repo.database_dump(), before, "the database is unchanged");
    if let Some(file_before) = file_before {
        assert_eq!(std::fs::read(&file).expect("db"), file_before, "not a byte");
    }
}

fn runner_state(server: &Server, name: &str) -> Value {
    let runners = server.ctl(&["runners", "--json"]).json();
    runners
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

#[test]
fn a_drained_runner_finishes_its_work_takes_nothing_new_and_stays_drained_until_undrained() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let r = runner(&repo, &server, "r");
    let first = server.add(&["--title", "first", "--description", "MODE: wait"]);
    repo.wait_agent(&first);
    let said = server.ctl(&["runners", "drain", "r"]).ok();
    assert!(said.contains("r: draining"), "{said}");
    assert_eq!(runner_state(&server, "r")["state"], "draining");
    let second = server.add(&["--title", "second"]);
    repo.release_agents();
    server.wait_status(&first, "done");
    // Back in its slot's freedom, it still takes nothing; nor after a restart of the runner.
    let mut r = r;
    r.proc.signal("TERM");
    assert!(r.proc.wait_exit().success());
    let _r = runner(&repo, &server, "r");
    wait_for("the runner to be back, drained", || {
        (runner_state(&server, "r")["state"] == "draining").then_some(())
    });
    assert_eq!(server.show(&second)["status"], "open");
    server.ctl(&["runners", "undrain", "r"]).ok();
    server.wait_status(&second, "done");
    server
        .ctl(&["runners", "drain", "nobody"])
        .refused(3, "no runner named nobody");
}

#[test]
fn a_task_is_edited_when_no_agent_works_on_it_and_its_history_says_so() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let id = server.add(&["--title", "old title", "--namespace", "Old.hs"]);
    let said = server
        .ctl(&[
            "task",
            "edit",
            &id,
            "--title",
            "new title",
            "--priority",
            "0",
            "--namespace",
            "",
            "--description",
            "now with a description",
        ])
        .ok();
    assert_eq!(said, format!("{id}: edited\n"));
    let task = server.show(&id);
    assert_eq!(task["title"], "new title");
    assert_eq!(task["priority"], 0);
    assert_eq!(task["namespace"], Value::Null, "cleared");
    assert_eq!(task["description"], "now with a description");
    let edited = task["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["kind"] == "edited").cloned())
        .expect("an edit in the history");
    assert_eq!(
        edited["message"],
        "title, description, namespace, priority changed by pipelinectl"
    );
    server
        .ctl(&["task", "edit", &id])
        .refused(2, "nothing to change");
    server
        .ctl(&["task", "edit", &id, "--priority", "9"])
        .refused(2, "invalid priority 9");
    server
        .ctl(&["task", "edit", "ghost", "--title", "x"])
        .refused(3, "ghost");
    // While an agent works on it: refused, and nothing changes.
    let _r = runner(&repo, &server, "r");
    let busy = server.add(&["--title", "busy", "--description", "MODE: wait"]);
    repo.wait_agent(&busy);
    server
        .ctl(&["task", "edit", &busy, "--title", "x"])
        .refused(4, "an agent is working on it; pass --next-attempt");
    assert_eq!(server.show(&busy)["title"], "busy");
    // With --next-attempt the edit is taken now, for the attempt after this one.
    server
        .ctl(&[
            "task",
            "edit",
            &busy,
            "--description",
            "MODE: commit, next time",
            "--next-attempt",
        ])
        .ok();
    let edited = server.show(&busy);
    assert_eq!(edited["status"], "in_progress");
    assert_eq!(edited["description"], "MODE: commit, next time");
    assert!(
        edited["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["message"]
                == "description changed by pipelinectl (for its next attempt; the one under way \
                keeps its prompt)")),
        "{edited}"
    );
    repo.release_agents();
    server.wait_status(&busy, "done");
    server
        .ctl(&["task", "edit", &busy, "--title", "x"])
        .refused(4, "it is done");
}

/// The runner named in a task's dev runs.
fn dev_runners(task: &Value) -> Vec<String> {
    task["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .filter(|r| r["phase"] == "dev")
        .filter_map(|r| r["runner"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_task_that_requires_labels_goes_only_to_a_runner_that_has_them_and_says_why_it_waits() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _plain = runner(&repo, &server, "plain");
    let gpu = server.add(&[
        "--title",
        "needs a gpu",
        "--requires",
        "gpu",
        "--requires",
        "os=linux",
    ]);
    let any = server.add(&["--title", "runs anywhere"]);
    // The task behind it needs no labels: it is not held up.
    server.wait_status(&any, "done");
    let waiting = server.show(&gpu);
    assert_eq!(waiting["status"], "open");
    assert_eq!(waiting["requires"], serde_json::json!(["gpu", "os=linux"]));
    assert_eq!(
        waiting["waiting_for"],
        serde_json::json!([
            "no connected runner has the labels it requires (gpu, os=linux); start one with \
             --label for each"
        ])
    );
    let shown = server.ctl(&["task", "show", &gpu]).ok();
    assert!(shown.contains("requires:    gpu, os=linux"), "{shown}");
    // A runner with only one of them does not take it either.
    let half = agent_args(&["--no-verify", "--label", "gpu=a100"]);
    let _half = Runner::start(&repo, &server, "half", &as_strs(&half));
    let another = server.add(&["--title", "another"]);
    server.wait_status(&another, "done");
    assert_eq!(server.show(&gpu)["status"], "open");
    let full = agent_args(&["--no-verify", "--label", "gpu=a100", "--label", "os=linux"]);
    let _full = Runner::start(&repo, &server, "full", &as_strs(&full));
    let landed = server.wait_status(&gpu, "done");
    assert_eq!(dev_runners(&landed), ["full"]);
    assert_eq!(
        runner_state(&server, "full")["labels"],
        serde_json::json!(["gpu=a100", "os=linux"])
    );
    let table = server.ctl(&["runners"]).ok();
    assert!(table.contains("gpu=a100,os=linux"), "{table}");
    // Edited to require what no runner has, an open task waits again; refusals name the value.
    let later = server.add(&[
        "--title",
        "later",
        "--requires",
        "arch=riscv",
        "--priority",
        "0",
    ]);
    assert_eq!(server.show(&later)["status"], "open");
    server
        .ctl(&["task", "edit", &later, "--requires", "os=linux"])
        .ok();
    let done = server.wait_status(&later, "done");
    assert_eq!(dev_runners(&done), ["full"]);
    assert!(event_kinds(&done).contains(&"edited".to_owned()), "{done}");
    server
        .ctl(&["task", "add", "--title", "x", "--requires", "-rf"])
        .refused(2, "invalid --requires \"-rf\"");
    server
        .ctl(&["task", "add", "--title", "x", "--requires", "a b"])
        .refused(2, "KEY or KEY=VALUE");
}

#[test]
fn runners_limited_to_an_epic_or_one_task_take_only_that_work() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let epic = server.add(&["--title", "the epic", "--id", "e1"]);
    let child = server.add(&["--title", "a child", "--parent", &epic]);
    let solo = server.add(&["--title", "alone", "--id", "solo"]);
    let stray = server.add(&["--title", "neither"]);
    let second_child = server.add(&[
        "--title",
        "another child",
        "--parent",
        &epic,
        "--priority",
        "0",
    ]);
    // The epic's children, highest priority first; the others are not in the list.
    let listed = server
        .ctl(&["task", "list", "--parent", &epic, "--json"])
        .json();
    let ids: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert_eq!(ids, [second_child.as_str(), child.as_str()]);
    server
        .ctl(&["task", "list", "--parent", "-rf"])
        .refused(2, "parent");
    let scoped = agent_args(&["--no-verify", "--only-parent", &epic]);
    let _epic_runner = Runner::start(&repo, &server, "epic-only", &as_strs(&scoped));
    let one = agent_args(&["--no-verify", "--only-task", &solo]);
    let _solo_runner = Runner::start(&repo, &server, "solo-only", &as_strs(&one));
    assert_eq!(
        dev_runners(&server.wait_status(&child, "done")),
        ["epic-only"]
    );
    assert_eq!(
        dev_runners(&server.wait_status(&second_child, "done")),
        ["epic-only"]
    );
    assert_eq!(
        server.show(&epic)["children"],
        serde_json::json!([
            {"id": second_child, "status": "done"},
            {"id": child, "status": "done"},
        ])
    );
    let shown = server.ctl(&["task", "show", &epic]).ok();
    assert!(
        shown.contains(&format!(
            "children:    2 of 2 done, 0 cents together: {second_child} (done), {child} (done)"
        )),
        "{shown}"
    );
    assert_eq!(server.show(&stray)["children"], serde_json::json!([]));
    assert_eq!(server.show(&epic)["children_cost_cents"], 0.0);
    assert_eq!(
        dev_runners(&server.wait_status(&solo, "done")),
        ["solo-only"]
    );
    // The epic was done with its children, without a run of its own.
    let done = server.wait_status(&epic, "done");
    assert_eq!(runs(&done), Vec::<Value>::new());
    let task = server.show(&stray);
    assert_eq!(task["status"], "open", "{task}");
    assert_eq!(
        task["waiting_for"],
        serde_json::json!([
            "every connected runner that could take it is limited to other work \
             (--only-parent, --only-task)"
        ])
    );
    // A runner that takes everything picks it up.
    let _any = runner(&repo, &server, "any");
    server.wait_status(&stray, "done");
}

#[test]
fn a_paused_epic_and_its_children_wait_until_resumed_while_other_work_goes_on() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let epic = server.add(&["--title", "the epic", "--id", "e1", "--priority", "0"]);
    let children: Vec<String> = (0..2)
        .map(|i| {
            server.add(&[
                "--title",
                &format!("child {i}"),
                "--parent",
                &epic,
                "--priority",
                "0",
            ])
        })
        .collect();
    let said = server
        .ctl(&["task", "pause", &epic, "--reason", "waiting for the API"])
        .ok();
    assert_eq!(said, format!("{epic}: paused (3 tasks)\n"));
    // A child added to a paused epic is paused with it.
    let mut children = children;
    children.push(server.add(&["--title", "late child", "--parent", &epic]));
    let _r = runner(&repo, &server, "r");
    let other = server.add(&["--title", "other work", "--priority", "4"]);
    server.wait_status(&other, "done");
    for id in children.iter().chain([&epic]) {
        let task = server.show(id);
        assert_eq!(task["status"], "open", "{task}");
        assert_eq!(task["paused"], "waiting for the API");
        assert_eq!(
            task["waiting_for"][0],
            format!("paused: waiting for the API (pipelinectl task resume {id})")
        );
    }
    assert!(event_kinds(&server.show(&epic)).contains(&"paused".to_owned()));
    let said = server.ctl(&["task", "resume", &epic]).ok();
    assert_eq!(said, format!("{epic}: resumed (4 tasks)\n"));
    for id in children.iter().chain([&epic]) {
        let task = server.wait_status(id, "done");
        assert_eq!(task["paused"], serde_json::Value::Null);
        assert!(event_kinds(&task).contains(&"resumed".to_owned()), "{task}");
    }
    server.ctl(&["task", "pause", "ghost"]).refused(3, "ghost");
}

#[test]
fn an_epic_is_never_leased_and_is_done_when_its_children_are() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let epic = server.add(&["--title", "the epic", "--id", "e1", "--priority", "0"]);
    let children: Vec<String> = (0..2)
        .map(|i| server.add(&["--title", &format!("child {i}"), "--parent", &epic]))
        .collect();
    let after = server.add(&["--title", "after the epic", "--depends-on", &epic]);
    let shown = server.show(&epic);
    assert_eq!(
        shown["waiting_for"],
        serde_json::json!(["an epic: it is done when its children are (0 of 2 done)"])
    );
    let _r = runner(&repo, &server, "r");
    let done = server.wait_status(&epic, "done");
    assert_eq!(runs(&done), Vec::<Value>::new(), "never leased itself");
    assert!(
        event_kinds(&done).contains(&"children_done".to_owned()),
        "{done}"
    );
    for child in &children {
        assert_eq!(server.show(child)["status"], "done");
    }
    server.wait_status(&after, "done");
    let landed = repo.landed();
    assert!(
        !landed.contains(&epic),
        "the epic has no commit: {landed:?}"
    );
    let text = server.ctl(&["task", "show", &epic]).ok();
    assert!(text.contains("children:    2 of 2 done"), "{text}");
    // A done epic takes no more children; nor does a task that does not exist.
    server
        .ctl(&["task", "add", "--title", "late", "--parent", &epic])
        .refused(4, "task e1 cannot take children: it is done");
    server
        .ctl(&["task", "add", "--title", "late", "--parent", "ghost"])
        .refused(3, "ghost");

    // A task that gets a child while its agent works stops, uncounted, and waits as an epic.
    let big = server.add(&["--title", "too big", "--description", "MODE: wait"]);
    repo.wait_agent(&big);
    let part = server.add(&["--title", "a part of it", "--parent", &big]);
    let epic_now = server.wait_task(&big, "an epic", |t| {
        t["status"] == "open" && runs(t).first().is_some_and(|r| r["status"] == "failure")
    });
    assert_eq!(epic_now["failures"], 0, "not counted: {epic_now}");
    assert_eq!(
        runs(&epic_now)[0]["error"],
        "stopped: the task became an epic (its children do the work)"
    );
    repo.release_task(&big);
    server.wait_status(&part, "done");
    let done = server.wait_status(&big, "done");
    assert_eq!(runs(&done).len(), 1, "its one stopped run: {done}");
    let explained = server.ctl(&["explain", &big]).ok();
    assert!(
        explained.contains("is an epic, done with its children (1 of 1 done"),
        "{explained}"
    );
    // A done task cannot be paused; an epic that does not exist has no children to list.
    server
        .ctl(&["task", "pause", &epic])
        .refused(4, "there is nothing of it to hold back");
    server
        .ctl(&["task", "list", "--parent", "ghost"])
        .refused(3, "ghost");

    // Cancelling an epic calls off its unfinished children, stopping their agents; retrying
    // it takes them up again, and it is done with them. (No agent of this test has been let
    // go by the release file that lets them all go, so `working` waits until cancelled.)
    // (Its own agent waits, so that it is still in progress when its first child comes: a
    // runner is connected, and a quick agent could finish it as a plain task first.)
    let off = server.add(&["--title", "called off", "--description", "MODE: wait"]);
    let working = server.add(&[
        "--title",
        "working",
        "--parent",
        &off,
        "--description",
        "MODE: wait-once",
    ]);
    repo.wait_agent(&working);
    let waiting = server.add(&[
        "--title",
        "waiting",
        "--parent",
        &off,
        "--depends-on",
        &working,
    ]);
    let queue = server.ctl(&["queue", "--json"]).json();
    assert!(
        queue["waiting"]
            .as_array()
            .is_some_and(|w| w.iter().all(|t| t["id"] != off.as_str())),
        "an epic is not in the line: {queue}"
    );
    server.ctl(&["task", "cancel", &off]).ok();
    for child in [&working, &waiting] {
        server.wait_status(child, "cancelled");
    }
    server.ctl(&["task", "retry", &off]).ok();
    server.wait_status(&working, "done");
    server.wait_status(&waiting, "done");
    server.wait_status(&off, "done");
}

#[test]
fn an_epics_children_finished_before_a_crash_leave_it_done_after_the_restart() {
    let repo = TestRepo::new();
    let mut cmd = Server::command(&repo, &[]);
    cmd.env("PIPELINE_FAILPOINT", "before-epic-done");
    let mut server = Server::spawn(&mut cmd).expect("server");
    let addr = server.addr.clone();
    let epic = server.add(&["--title", "the epic"]);
    let child = server.add(&["--title", "its only child", "--parent", &epic]);
    let _r = runner(&repo, &server, "r");
    let status = server.proc.wait_exit();
    assert!(!status.success(), "aborted at the failpoint: {status:?}");
    let server = Server::start(&repo, &["--listen", &addr]);
    assert_eq!(server.show(&child)["status"], "done");
    let done = server.wait_status(&epic, "done");
    assert!(
        event_kinds(&done).contains(&"children_done".to_owned()),
        "{done}"
    );
    assert_eq!(repo.landed(), [child], "landed once");
}

#[test]
fn an_epics_cap_stops_leasing_its_children_until_raised() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--max-retries", "0", "--backoff-base", "0"]);
    let epic = server.add(&["--title", "the epic", "--id", "e1", "--max-cost", "25"]);
    // The scripted agent fails and reports 10 cents an attempt.
    let child = server.add(&[
        "--title",
        "costly",
        "--parent",
        &epic,
        "--description",
        "MODE: costly-fail",
    ]);
    let _r = runner(&repo, &server, "r");
    let stopped = server.wait_status(&child, "needs_help");
    assert_eq!(
        stopped["cost_cents"], 30.0,
        "three attempts of 10: {stopped}"
    );
    assert_eq!(stopped["failures"], 3);
    assert_eq!(server.show(&epic)["children_cost_cents"], 30.0);
    assert_eq!(
        stopped["waiting_for"],
        serde_json::json!([format!(
            "its epic e1 has spent 30 of its 25-cent cap (pipelinectl task edit e1 --max-cost \
             CENTS, then pipelinectl task retry {child})"
        )])
    );
    assert!(
        event_kinds(&stopped).contains(&"epic_cap".to_owned()),
        "{stopped}"
    );
    let explained = server.ctl(&["explain", &child]).ok();
    assert!(explained.contains("its epic's cap is spent"), "{explained}");
    // A retry under the spent cap would stop at once: refused, saying what to do.
    server.ctl(&["task", "retry", &child]).refused(
        4,
        "raise it first (pipelinectl task edit e1 --max-cost CENTS)",
    );
    // Raising the cap and retrying lets it go on.
    server
        .ctl(&["task", "edit", &epic, "--max-cost", "1000"])
        .ok();
    server
        .ctl(&["task", "edit", &child, "--description", "MODE: ok"])
        .ok();
    server.ctl(&["task", "retry", &child]).ok();
    server.wait_status(&child, "done");
    server.wait_status(&epic, "done");
    assert_eq!(server.show(&epic)["max_cost_cents"], 1000.0);
    // 0 removes a task's own cap; a negative one is refused.
    let other = server.add(&["--title", "capped", "--max-cost", "40", "--requires", "gpu"]);
    server
        .ctl(&["task", "edit", &other, "--max-cost", "0"])
        .ok();
    assert_eq!(server.show(&other)["max_cost_cents"], Value::Null);
    server
        .ctl(&["task", "edit", &other, "--max-cost", "-5"])
        .refused(2, "invalid --max-cost -5");
}

#[test]
fn queue_estimates_when_open_tasks_start_from_free_slots_and_recent_runs() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _r = runner(&repo, &server, "r");
    // One run to go by.
    let first = server.add(&["--title", "first"]);
    server.wait_status(&first, "done");
    let busy = server.add(&["--title", "busy", "--description", "MODE: wait"]);
    repo.wait_agent(&busy);
    let next = server.add(&["--title", "next"]);
    let after = server.add(&["--title", "after"]);
    let blocked = server.add(&["--title", "blocked", "--depends-on", &after]);
    let queue = server.ctl(&["queue", "--json"]).json();
    let eta = |id: &str| {
        queue["waiting"]
            .as_array()
            .and_then(|w| w.iter().find(|t| t["id"] == id))
            .map(|t| t["eta_seconds"].clone())
            .unwrap_or_else(|| panic!("{id} in {queue}"))
    };
    let (n, a) = (
        eta(&next).as_f64().expect("an estimate"),
        eta(&after).as_f64().expect("an estimate"),
    );
    assert!(
        n >= 0.0 && a >= 2.0 * n - 1e-9,
        "one run per slot round: {queue}"
    );
    assert_eq!(eta(&blocked), Value::Null, "it waits for more than a slot");
    let text = server.ctl(&["queue"]).ok();
    assert!(text.contains("starts ~"), "{text}");
    repo.release_agents();
    server.wait_status(&blocked, "done");
}

#[test]
fn a_paused_queue_leases_nothing_and_status_says_why_and_since_when() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let said = server
        .ctl(&["queue", "pause", "--reason", "release freeze"])
        .ok();
    assert!(said.contains("paused"), "{said}");
    let _r = runner(&repo, &server, "r");
    let held = server.add(&["--title", "held"]);
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["queue_paused"], true);
    assert_eq!(status["queue_pause_reason"], "release freeze");
    assert!(status["queue_paused_since"].is_string(), "{status}");
    let text = server.ctl(&["status"]).ok();
    assert!(
        text.contains("leases:          PAUSED by pipelinectl queue pause since ")
            && text.contains(": release freeze (pipelinectl queue resume)"),
        "{text}"
    );
    let task = server.show(&held);
    assert_eq!(task["status"], "open");
    assert_eq!(
        task["waiting_for"],
        serde_json::json!([
            "the queue is paused, so no new leases: release freeze (pipelinectl queue resume)"
        ])
    );
    // The pause outlives a restart (it is stored), then resume lets the task go.
    let addr = server.addr.clone();
    server.terminate();
    let server = Server::start(&repo, &["--listen", &addr]);
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["queue_pause_reason"], "release freeze");
    server.ctl(&["queue", "resume"]).ok();
    server.wait_status(&held, "done");
    let status = server.ctl(&["status", "--json"]).json();
    assert_eq!(status["queue_paused"], false);
    assert_eq!(status["queue_pause_reason"], Value::Null);
}

/// A verification that fails an agent's first attempt (its note says "attempt 1") and passes
/// the second; the base, without notes, is green.
const FAILS_THE_FIRST_ATTEMPT: &str =
    "! ls notes/*.md >/dev/null 2>&1 || grep -q 'attempt 2' notes/*.md";

#[test]
fn the_prompt_names_the_verification_and_carries_the_projects_agents_md() {
    let repo = TestRepo::new();
    repo.push_to_main("AGENTS.md", "Run the linter before you commit.\n");
    let server = Server::start(
        &repo,
        &["--test-cmd", FAILS_THE_FIRST_ATTEMPT, "--backoff-base", "0"],
    );
    let _r = Runner::start(&repo, &server, "r", &as_strs(&agent_args(&[])));
    let id = server.add(&["--title", "with instructions"]);
    server.wait_status(&id, "done");
    let first = repo
        .agent_file(&format!("dev-{id}-1.prompt"))
        .expect("the first prompt");
    assert!(
        first.contains(&format!(
            "judged by this verification, run in the workspace: `{FAILS_THE_FIRST_ATTEMPT}` (tests)"
        )),
        "{first}"
    );
    assert!(
        first.contains("## Project instructions (AGENTS.md)\nRun the linter before you commit.\n"),
        "{first}"
    );
}

#[test]
fn a_prompt_template_shapes_the_prompt_from_the_tasks_fields_and_its_feedback() {
    let repo = TestRepo::new();
    repo.push_to_main("AGENTS.md", "Use tabs.\n");
    let template = repo.dir.path().join("prompt.j2");
    std::fs::write(
        &template,
        "Task {{ task.id }} ({{ task.title }}), attempt {{ task.attempt }}, patchset \
         {{ task.patchset }} on {{ base }}.\n\
         {{ task.description }}\n\
         Judged by: {{ verification }}\n\
         House rules: {{ instructions }}\n\
         {% if feedback %}The previous patchset was rejected: {{ feedback }}\n{% endif %}\
         {% if note %}A person says: {{ note }}\n{% endif %}",
    )
    .expect("write");
    let template = template.to_str().expect("utf-8").to_owned();
    let server = Server::start(
        &repo,
        &[
            "--prompt-template",
            &template,
            "--test-cmd",
            FAILS_THE_FIRST_ATTEMPT,
            "--backoff-base",
            "0",
        ],
    );
    let _r = Runner::start(&repo, &server, "r", &as_strs(&agent_args(&[])));
    let id = server.add(&["--title", "shaped", "--description", "Do the thing."]);
    let task = server.wait_status(&id, "done");
    assert_eq!(task["failures"], 1, "{task}");
    let first = repo
        .agent_file(&format!("dev-{id}-1.prompt"))
        .expect("the first prompt");
    assert_eq!(
        first,
        format!(
            "Task {id} (shaped), attempt 1, patchset 0 on main.\nDo the thing.\n\
             Judged by: `{FAILS_THE_FIRST_ATTEMPT}` (tests)\nHouse rules: Use tabs.\n"
        )
    );
    let second = repo
        .agent_file(&format!("dev-{id}-2.prompt"))
        .expect("the second prompt");
    assert!(
        second.starts_with(&format!(
            "Task {id} (shaped), attempt 2, patchset 1 on main."
        )),
        "{second}"
    );
    assert!(
        second.contains("The previous patchset was rejected: tests failed (exit 1)"),
        "{second}"
    );
}

#[test]
fn a_prompt_template_that_does_not_parse_or_names_an_unknown_variable_is_refused_at_start_up() {
    let repo = TestRepo::new();
    let template = repo.dir.path().join("prompt.j2");
    for (source, says) in [
        (
            "# Task\n\nDo {{ task.titel }} now.\n",
            ":3:7: unknown variable task.titel",
        ),
        ("# Task\n\n{% if note %}{{ note }}\n", ":3:"),
    ] {
        std::fs::write(&template, source).expect("write");
        let path = template.to_str().expect("utf-8");
        let log = Server::spawn(&mut Server::command(&repo, &["--prompt-template", path]))
            .err()
            .expect("refused");
        assert!(
            log.contains(&format!("--prompt-template {path}{says}")),
            "{log}"
        );
        assert!(
            !repo.state_dir().join("pipeline.db").exists(),
            "refused before anything was created"
        );
    }
}

#[test]
fn queue_shows_what_is_in_progress_instead_of_nothing_waiting() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _r = runner(&repo, &server, "r");
    let id = server.add(&["--title", "at work", "--description", "MODE: wait"]);
    repo.wait_agent(&id);
    let queue = server.ctl(&["queue", "--json"]).json();
    let running = queue["running"].as_array().cloned().unwrap_or_default();
    assert_eq!(running.len(), 1, "{queue}");
    assert_eq!(running[0]["id"], id.as_str(), "{queue}");
    assert_eq!(running[0]["runner"], "r", "{queue}");
    assert!(running[0]["since"].is_string(), "{queue}");
    assert_eq!(queue["waiting"], serde_json::json!([]), "{queue}");
    let text = server.ctl(&["queue"]).ok();
    assert!(!text.contains("nothing waiting"), "{text}");
    assert!(text.contains("in progress (1):"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("{id} ")) && l.contains(" r ")),
        "{text}"
    );
    repo.release_agents();
    server.wait_status(&id, "done");
    let text = server.ctl(&["queue"]).ok();
    assert!(text.contains("nothing in progress or waiting"), "{text}");
}

#[test]
fn an_epic_created_as_one_is_never_leased_while_its_children_are_added() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _runner = runner(&repo, &server, "r");
    // The epic comes first in lease order (same priority, older): a runner free for work
    // still passes it over and takes the plain task behind it.
    let epic = server.add(&["--title", "the plan", "--epic"]);
    let plain = server.add(&["--title", "plain"]);
    server.wait_status(&plain, "done");
    let shown = server.show(&epic);
    assert_eq!(shown["status"], "open", "{shown}");
    assert_eq!(shown["epic"], true, "{shown}");
    assert_eq!(shown["children"], serde_json::json!([]), "{shown}");
    assert!(runs(&shown).is_empty(), "never leased: {shown}");
    assert!(
        shown["waiting_for"][0]
            .as_str()
            .is_some_and(|w| w.contains("an epic with no children yet")),
        "{shown}"
    );
    let text = server.ctl(&["task", "show", &epic]).ok();
    assert!(text.contains("children:    none yet"), "{text}");
    let explained = server.ctl(&["explain", &epic]).ok();
    assert!(
        explained.contains("is an epic with no children yet"),
        "{explained}"
    );
    let listed = server.ctl(&["task", "list", "--json"]).json();
    let row = listed
        .as_array()
        .and_then(|l| l.iter().find(|t| t["id"] == epic.as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(row["epic"], true, "{listed}");

    // Its children, added one by one, do the work; it is done with them, never worked on.
    let first = server.add(&[
        "--title",
        "step 1",
        "--parent",
        &epic,
        "--description",
        "MODE: wait",
    ]);
    repo.wait_agent(&first);
    let second = server.add(&["--title", "step 2", "--parent", &epic]);
    assert_eq!(server.show(&epic)["status"], "open");
    repo.release_agents();
    server.wait_status(&first, "done");
    server.wait_status(&second, "done");
    // Done once every child is done: the epic has no runs of its own.
    let done = server.wait_status(&epic, "done");
    assert!(runs(&done).is_empty(), "{done}");
    assert_eq!(done["epic"], true);

    // The same from a file: the key `epic`.
    let file = repo.dir.path().join("plan.jsonl");
    std::fs::write(
        &file,
        "{\"title\": \"a filed plan\", \"epic\": true, \"id\": \"filed\"}\n\
         {\"title\": \"its step\", \"parent\": \"filed\", \"id\": \"filed-1\"}\n",
    )
    .expect("write");
    let ids = server
        .ctl(&["task", "add", "--from-file", file.to_str().expect("utf-8")])
        .ok();
    assert_eq!(ids.lines().collect::<Vec<_>>(), ["filed", "filed-1"]);
    server.wait_status("filed-1", "done");
    let filed = server.wait_status("filed", "done");
    assert_eq!(filed["epic"], true);
    assert!(runs(&filed).is_empty(), "{filed}");
}

/// The race fixed in 894e18d, made to happen every time: a child's creation is held (a fault
/// point) after its parent was checked (open) and before the child is written; meanwhile a
/// runner leases the parent and its agent starts. Once the child is written, the parent's
/// run must be stopped (it became an epic) so that its child gets the slot. With the old
/// order (the parents in progress read before the write) the parent's agent went on beside
/// its child, holding the runner's one slot.
#[test]
fn a_parent_leased_while_its_first_child_is_added_stops_for_the_child() {
    let repo = TestRepo::new();
    let gate = repo.dir.path().join("gate");
    let mut cmd = Server::command(&repo, &[]);
    cmd.env("PIPELINE_FAILPOINT", "child-after-parent-check")
        .env("PIPELINE_FAILPOINT_FILE", &gate);
    let server = Server::spawn(&mut cmd).unwrap_or_else(|log| panic!("server:\n{log}"));
    let parent = server.add(&["--title", "parent", "--description", "MODE: wait"]);
    let adding = {
        let (url, parent) = (server.url.clone(), parent.clone());
        std::thread::spawn(move || {
            pipeline_tests::ctl(
                &url,
                &["task", "add", "--title", "child", "--parent", &parent],
            )
        })
    };
    wait_for("the child's creation to reach the fault point", || {
        gate.with_extension("reached").exists().then_some(())
    });
    assert_eq!(server.show(&parent)["status"], "open", "checked while open");
    let _runner = runner(&repo, &server, "r");
    let agent = repo.wait_agent(&parent);
    assert_eq!(server.show(&parent)["status"], "in_progress");
    std::fs::write(&gate, b"").expect("open the gate");
    let child = adding.join().expect("task add").ok().trim().to_owned();

    // The parent's agent is stopped (not counted), the child takes the slot and lands, and
    // the parent is done with it, without its own run ever delivering.
    wait_for("the parent's agent to stop", || {
        (!pipeline_tests::alive(&agent)).then_some(())
    });
    server.wait_status(&child, "done");
    let done = server.wait_status(&parent, "done");
    assert!(
        event_kinds(&done).contains(&"became_epic".to_owned()),
        "{done}"
    );
    assert_eq!(done["failures"], 0);
    assert_eq!(
        done["patchset"], 0,
        "the parent's own work never landed: {done}"
    );
    repo.release_agents();
}
