//! The control API end to end: the real `pipeline-server` on a loopback port, driven by the
//! real `pipelinectl`.

use pipeline_tests::{Server, TestRepo, ctl, run};
use serde_json::Value;

fn assert_task_shape(task: &Value) {
    for key in [
        "id",
        "title",
        "status",
        "priority",
        "patchset",
        "namespace",
        "depends_on",
        "parent",
    ] {
        assert!(task.get(key).is_some(), "task JSON lacks {key}: {task}");
    }
    assert!(task["id"].is_string());
    assert!(task["priority"].is_u64());
    assert!(task["patchset"].is_u64());
    assert!(task["depends_on"].is_array());
}

#[test]
fn add_list_show_cancel_retry() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);

    let first = server.add(&[
        "--title",
        "Write the parser",
        "--description",
        "Parse the input.\nSecond line.",
        "--namespace",
        "Omni/Parser.hs",
        "--priority",
        "1",
    ]);
    assert_eq!(first, "t-1", "task add prints the new ID alone");
    let second = server.add(&["--title", "Use the parser", "--depends-on", &first]);
    assert_eq!(second, "t-2");
    let chosen = server.add(&["--title", "Urgent", "--priority", "0", "--id", "fix-42"]);
    assert_eq!(chosen, "fix-42");
    let child = server.add(&["--title", "Sub-task", "--parent", &first]);

    // List: priority first, then age.
    let list = server.ctl(&["task", "list", "--json"]).json();
    let ids: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|t| t["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["fix-42", "t-1", "t-2", child.as_str()]);
    for task in list.as_array().expect("array") {
        assert_task_shape(task);
        assert_eq!(task["status"], "open");
    }
    let table = server.ctl(&["task", "list"]).ok();
    let header = table.lines().next().expect("header");
    assert!(header.starts_with("ID") && header.contains("STATUS") && header.contains("TITLE"));
    assert!(table.contains("Write the parser"));

    // Show, with runs and events.
    let shown = server.ctl(&["task", "show", &second, "--json"]).json();
    assert_task_shape(&shown);
    assert_eq!(shown["depends_on"], serde_json::json!(["t-1"]));
    assert_eq!(shown["parent"], Value::Null);
    assert_eq!(shown["namespace"], Value::Null);
    assert_eq!(shown["runs"], serde_json::json!([]));
    assert_eq!(shown["events"][0]["kind"], "created");
    let shown = server.ctl(&["task", "show", &first, "--json"]).json();
    assert_eq!(shown["namespace"], "Omni/Parser.hs");
    assert_eq!(shown["priority"], 1);
    assert_eq!(shown["description"], "Parse the input.\nSecond line.");
    let shown = server.ctl(&["task", "show", &child, "--json"]).json();
    assert_eq!(shown["parent"], "t-1");
    let human = server.ctl(&["task", "show", &first]).ok();
    assert!(human.contains("status:      open"), "{human}");
    assert!(human.contains("  Second line."), "{human}");

    // Cancel, then retry.
    assert_eq!(
        server.ctl(&["task", "cancel", &second]).ok().trim(),
        "t-2: cancelled"
    );
    let listed = server
        .ctl(&["task", "list", "--status", "cancelled", "--json"])
        .json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert_eq!(listed[0]["id"], "t-2");
    server
        .ctl(&["task", "cancel", &second])
        .refused(4, "cancelled already");
    assert_eq!(
        server.ctl(&["task", "retry", &second]).ok().trim(),
        "t-2: open"
    );
    let shown = server.ctl(&["task", "show", &second, "--json"]).json();
    assert_eq!(shown["status"], "open");
    let kinds: Vec<&str> = shown["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["created", "cancelled", "retried"]);
    assert_eq!(shown["events"][1]["from"], "open");
    assert_eq!(shown["events"][1]["to"], "cancelled");

    // Status counts.
    server.ctl(&["task", "cancel", &chosen]).ok();
    let status = server.ctl(&["status", "--json"]).json();
    for key in [
        "open",
        "in_progress",
        "verified",
        "done",
        "needs_help",
        "cancelled",
        "active_dev_runs",
        "runners",
    ] {
        assert!(status[key].is_u64(), "status.{key} is an integer: {status}");
    }
    assert_eq!(status["open"], 3);
    assert_eq!(status["cancelled"], 1);
    assert_eq!(status["runners"], 0);
    let human = server.ctl(&["status"]).ok();
    assert!(human.contains("open:            3"), "{human}");

    // Runners: none yet, in both forms.
    assert_eq!(
        server.ctl(&["runners", "--json"]).json(),
        serde_json::json!([])
    );
    assert_eq!(server.ctl(&["runners"]).ok().trim(), "no runners");
}

#[test]
fn description_from_a_file_and_from_stdin() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let file = repo.dir.path().join("desc.md");
    std::fs::write(&file, "From a file.\n").expect("write");
    let id = server.add(&[
        "--title",
        "t",
        "--description-file",
        file.to_str().expect("utf-8"),
    ]);
    let shown = server.ctl(&["task", "show", &id, "--json"]).json();
    assert_eq!(shown["description"], "From a file.\n");

    let out = run(server
        .ctl_command()
        .args(["task", "add", "--title", "stdin"])
        .args(["--description-file", "/nonexistent/desc"]));
    out.refused(2, "cannot read --description-file /nonexistent/desc");
}

#[test]
fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let a = server.add(&["--title", "a"]);
    let b = server.add(&["--title", "b", "--depends-on", &a]);
    let before = server.ctl(&["task", "list", "--json"]).json();

    let long = "x".repeat(80);
    for (id, says) in [
        ("../x", "invalid task id \"../x\""),
        ("-x", "invalid task id \"-x\""),
        ("a b", "a space is not allowed"),
        (long.as_str(), "limit is 64"),
        ("", "invalid task id \"\": it is empty"),
        ("x.lock", "must not end with '.lock'"),
    ] {
        server
            .ctl(&["task", "add", "--title", "t", "--id", id])
            .refused(2, says);
        server.ctl(&["task", "show", id]).refused(2, says);
        server.ctl(&["task", "cancel", id]).refused(2, says);
        server.ctl(&["task", "retry", id]).refused(2, says);
    }
    server
        .ctl(&["task", "add", "--title", "t", "--priority", "9"])
        .refused(2, "invalid priority 9: use 0 (highest) to 4 (lowest)");
    server
        .ctl(&["task", "add", "--title", " "])
        .refused(2, "a task needs a title");
    server
        .ctl(&["task", "show", "nope"])
        .refused(3, "task nope does not exist");
    server
        .ctl(&["task", "cancel", "nope"])
        .refused(3, "task nope does not exist");
    server
        .ctl(&["task", "retry", "nope"])
        .refused(3, "task nope does not exist");
    server
        .ctl(&["task", "add", "--title", "t", "--depends-on", "ghost"])
        .refused(3, "dependency ghost does not exist; create it first");
    server
        .ctl(&["task", "add", "--title", "t", "--parent", "ghost"])
        .refused(3, "parent task ghost does not exist");
    server
        .ctl(&["task", "add", "--title", "t", "--id", &a])
        .refused(4, "task t-1 already exists");
    server
        .ctl(&[
            "task",
            "add",
            "--title",
            "t",
            "--id",
            "self",
            "--depends-on",
            "self",
        ])
        .refused(2, "task self cannot depend on itself");
    // A cycle: b already depends on a.
    server
        .ctl(&["task", "depend", &a, "--on", &b])
        .refused(4, "would make a cycle");
    // Itself: never valid, said so (as for `task add` above).
    server
        .ctl(&["task", "depend", &a, "--on", &a])
        .refused(2, &format!("task {a} cannot depend on itself"));
    server.ctl(&["task", "retry", &b]).ok();
    server
        .ctl(&["task", "list", "--status", "bogus"])
        .code()
        .filter(|c| *c == 2)
        .expect("unknown status is a usage error");

    let after = server.ctl(&["task", "list", "--json"]).json();
    // `retry` of an open task is allowed and only clears its (zero) count: compare the rest.
    let strip = |v: &Value| {
        v.as_array()
            .expect("array")
            .iter()
            .map(|t| {
                (
                    t["id"].clone(),
                    t["status"].clone(),
                    t["depends_on"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&before), strip(&after), "refusals changed nothing");
    assert_eq!(after.as_array().map(Vec::len), Some(2));
}

#[test]
fn a_server_that_cannot_be_reached_is_one_line() {
    // Port 1 on loopback: nothing listens there.
    let out = ctl("http://127.0.0.1:1", &["status"]);
    let line = out.refused(5, "cannot reach the pipeline server at http://127.0.0.1:1");
    assert!(line.contains("PIPELINE_SERVER"), "{line}");
    let out = ctl("http://127.0.0.1:1", &["task", "list"]);
    out.refused(5, "cannot reach");
    let out = ctl("not a url", &["status"]);
    out.refused(2, "invalid server URL");
}

#[test]
fn state_survives_restarts_and_sigkill() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let a = server.add(&["--title", "kept", "--priority", "3"]);
    let b = server.add(&["--title", "also kept", "--depends-on", &a]);
    server.ctl(&["task", "cancel", &b]).ok();
    let before = server.ctl(&["task", "show", &b, "--json"]).json();
    let status = server.terminate();
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");

    let server = Server::start(&repo, &[]);
    let after = server.ctl(&["task", "show", &b, "--json"]).json();
    assert_eq!(before, after);
    assert_eq!(
        server.ctl(&["task", "show", &a, "--json"]).json()["priority"],
        3
    );
    // The ID counter survives too.
    let c = server.add(&["--title", "third"]);
    assert_eq!(c, "t-3");

    // SIGKILL right after a write: the write is durable.
    let d = server.add(&["--title", "written just before the kill"]);
    server.kill();
    let server = Server::start(&repo, &[]);
    let shown = server.ctl(&["task", "show", &d, "--json"]).json();
    assert_eq!(shown["title"], "written just before the kill");
    assert_eq!(
        server.ctl(&["status", "--json"]).json()["open"],
        3,
        "a, t-3 and d are open; b is cancelled"
    );
}

#[test]
fn the_database_lives_in_the_state_dir_or_where_db_says() {
    let repo = TestRepo::new();
    // About the SQLite file itself: where the default `pipeline.db` is made, and another
    // one named by `--db sqlite://` (PostgreSQL's refusal is checked below either way).
    repo.sqlite_only();
    let server = Server::start(&repo, &[]);
    server.add(&["--title", "x"]);
    drop(server);
    assert!(repo.state_dir().join("pipeline.db").is_file());

    let other = repo.dir.path().join("elsewhere.db");
    let url = format!("sqlite://{}", other.display());
    // Another database on the same repository takes it over only when told to.
    let refused = Server::spawn(&mut Server::command(&repo, &["--db", &url]))
        .err()
        .expect("the repository is the first database's");
    assert!(
        refused.contains("belongs to another pipeline database"),
        "{refused}"
    );
    let server = Server::start(&repo, &["--db", &url, "--accept-existing-history"]);
    assert_eq!(server.ctl(&["status", "--json"]).json()["open"], 0);
    server.add(&["--title", "y"]);
    drop(server);
    assert!(other.is_file());
    // A PostgreSQL that cannot be reached is refused in one line, naming no password.
    let nowhere = repo.dir.path().join("no-postgres-here");
    let url = format!(
        "postgres://u:secret@localhost/pipeline?host={}",
        nowhere.display()
    );
    let refused = Server::spawn(&mut Server::command(&repo, &["--db", &url]))
        .err()
        .expect("no PostgreSQL there");
    assert!(
        refused.contains("is PostgreSQL running there?"),
        "{refused}"
    );
    assert!(!refused.contains("secret"), "{refused}");
}

#[test]
fn the_server_refuses_to_start_without_a_repo_or_base() {
    let repo = TestRepo::new();
    let not_a_repo = repo.dir.path().join("plain");
    std::fs::create_dir(&not_a_repo).expect("mkdir");
    let log = Server::spawn(
        repo.command("pipeline-server")
            .arg("--repo")
            .arg(&not_a_repo)
            .args(["--listen", "127.0.0.1:0"]),
    )
    .err()
    .expect("refused");
    assert!(log.contains("not a git repository"), "{log}");

    let log = Server::spawn(&mut Server::command(&repo, &["--base", "nope"]))
        .err()
        .expect("refused");
    assert!(log.contains("the base branch nope does not exist"), "{log}");

    let log = Server::spawn(&mut Server::command(&repo, &["--base=-rf"]))
        .err()
        .expect("refused");
    assert!(log.contains("not a valid branch name"), "{log}");
}

#[test]
fn the_server_accepts_the_contract_flags() {
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &[
            "--base",
            "main",
            "--max-retries",
            "3",
            "--max-task-cost",
            "500",
            "--backoff-base",
            "1",
            "--lease-ttl",
            "5",
            "--build-cmd",
            "make {namespace}",
            "--test-cmd",
            "make test",
            "--local-runners",
            "0",
            "--agent",
            "command",
            "--agent-cmd",
            "true",
            "--timeout",
            "60",
            "--max-iter",
            "3",
            "--max-cost",
            "10",
            "--provider",
            "p",
        ],
    );
    assert_eq!(server.ctl(&["status", "--json"]).json()["base"], "main");
}

#[test]
fn a_closed_pipe_ends_pipelinectl_quietly() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    for i in 0..50 {
        server.add(&[
            "--title",
            &format!("task number {i} with a title long enough to fill"),
        ]);
    }
    let mut child = server
        .ctl_command()
        .args(["task", "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // The reader goes away at once, like `| head -1` after its line.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_public_listen_address_without_tls_is_refused() {
    let repo = TestRepo::new();
    let log = Server::spawn(&mut Server::command(&repo, &["--listen", "0.0.0.0:0"]))
        .err()
        .expect("refused");
    assert!(
        log.contains("refusing to listen on 0.0.0.0:0 without TLS") && log.contains("--insecure"),
        "{log}"
    );
    let server = Server::start(&repo, &["--listen", "0.0.0.0:0", "--insecure"]);
    assert!(server.ctl(&["status", "--json"]).json()["open"].is_u64());
}

#[test]
fn hostile_descriptions_and_oversized_messages_are_refused() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let dir = repo.dir.path();
    let nul = dir.join("nul.txt");
    std::fs::write(&nul, "before\0after").expect("write");
    let big = dir.join("big.txt");
    std::fs::write(&big, "x".repeat(2 * 1024 * 1024)).expect("write");
    let huge = dir.join("huge.txt");
    std::fs::write(&huge, "x".repeat(5 * 1024 * 1024)).expect("write");
    let file = |p: &std::path::Path| p.to_str().expect("utf-8").to_owned();
    server
        .ctl(&[
            "task",
            "add",
            "--title",
            "t",
            "--description-file",
            &file(&nul),
        ])
        .refused(2, "the description contains a NUL byte");
    server
        .ctl(&[
            "task",
            "add",
            "--title",
            "t",
            "--description-file",
            &file(&big),
        ])
        .refused(
            2,
            "the description is 2097152 bytes, the limit is 1048576 (1 MiB)",
        );
    // Over the gRPC message limit: refused by the transport, with a reason.
    let line = server
        .ctl(&[
            "task",
            "add",
            "--title",
            "t",
            "--description-file",
            &file(&huge),
        ])
        .refused(2, "the request is too large for the server");
    assert!(line.contains("the limit is: 4194304 bytes"), "{line}");
    server
        .ctl(&["task", "add", "--title", "t", "--namespace=--help"])
        .refused(
            2,
            "invalid namespace \"--help\": it must not start with '-'",
        );
    assert_eq!(
        server.ctl(&["task", "list", "--json"]).json(),
        serde_json::json!([]),
        "nothing was created"
    );
}

/// `task add --from-file`: one task per JSON line, created in order (a task may depend on one
/// earlier in the file), one ID a line; `task list` walks the server's pages (1,000 at most
/// each) and prints every task once, in lease order, without descriptions; `--limit` stops
/// early.
#[test]
fn tasks_from_a_file_and_a_list_that_walks_pages() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let file = repo.dir.path().join("tasks.jsonl");
    let mut lines =
        String::from("{\"id\": \"root\", \"title\": \"the root\", \"priority\": 0}\n\n");
    for i in 0..2_499 {
        lines.push_str(&format!(
            "{{\"title\": \"task {i}\", \"description\": \"do {i}\", \"priority\": {}, \
             \"depends_on\": [\"root\"]}}\n",
            1 + i % 3
        ));
    }
    std::fs::write(&file, lines).expect("write");
    let out = server
        .ctl(&["task", "add", "--from-file", file.to_str().expect("utf-8")])
        .ok();
    let ids: Vec<&str> = out.lines().collect();
    assert_eq!(ids.len(), 2_500, "one ID a line");
    assert_eq!(ids[0], "root");
    assert_eq!(ids[1], "t-1");
    assert_eq!(ids[2_499], "t-2499");

    let listed = server.ctl(&["task", "list", "--json"]).json();
    let listed = listed.as_array().expect("an array");
    assert_eq!(listed.len(), 2_500, "every task once, across three pages");
    let mut seen: Vec<&str> = listed.iter().filter_map(|t| t["id"].as_str()).collect();
    assert_eq!(seen[0], "root", "priority 0 first");
    let priorities: Vec<u64> = listed
        .iter()
        .filter_map(|t| t["priority"].as_u64())
        .collect();
    assert!(priorities.windows(2).all(|w| w[0] <= w[1]), "lease order");
    assert!(
        listed.iter().all(|t| t["description"] == ""),
        "no descriptions"
    );
    assert_eq!(listed[1]["depends_on"], serde_json::json!(["root"]));
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 2_500, "no task twice");
    let shown = server.show("t-7");
    assert_eq!(shown["description"], "do 6", "show keeps it");

    let five = server
        .ctl(&["task", "list", "--limit", "5", "--json"])
        .json();
    assert_eq!(five.as_array().map(Vec::len), Some(5));
    let table = server.ctl(&["task", "list", "--limit", "3"]).ok();
    assert_eq!(table.lines().count(), 4, "a header and three rows: {table}");
    assert_eq!(
        server
            .ctl(&["task", "list", "--status", "done", "--json"])
            .ok(),
        "[]\n"
    );
    assert_eq!(
        server.ctl(&["task", "list", "--status", "done"]).ok(),
        "no tasks\n"
    );
    let zero = server.ctl(&["task", "list", "--limit", "0"]);
    assert_eq!(zero.code(), Some(2), "{}", zero.stderr);
    assert!(zero.stderr.contains("--limit"), "{}", zero.stderr);
}

#[test]
fn a_bad_line_in_a_task_file_is_named_and_nothing_is_created() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let file = repo.dir.path().join("tasks.jsonl");
    let path = file.to_str().expect("utf-8");
    std::fs::write(
        &file,
        "{\"title\": \"one\"}\n{\"title\": \"two\"}\n{\"title\": \"three\", \"dependson\": []}\n",
    )
    .expect("write");
    let said = server
        .ctl(&["task", "add", "--from-file", path])
        .refused(2, "line 3: unknown field `dependson`");
    assert!(said.contains("no task was created"), "{said}");
    // A dependency on a task that does not exist: the server refuses the whole batch.
    std::fs::write(
        &file,
        "{\"title\": \"one\"}\n{\"title\": \"two\", \"depends_on\": [\"ghost\"]}\n",
    )
    .expect("write");
    let said = server
        .ctl(&["task", "add", "--from-file", path])
        .refused(3, "task 2 of the batch: dependency ghost does not exist");
    assert!(said.contains("from line 1 to 2"), "{said}");
    assert_eq!(
        server.ctl(&["task", "list", "--json"]).json(),
        serde_json::json!([])
    );
    server
        .ctl(&["task", "add", "--from-file", "/nonexistent/tasks.jsonl"])
        .refused(2, "cannot read --from-file /nonexistent/tasks.jsonl");
    let no_title = server.ctl(&["task", "add"]);
    assert_eq!(
        no_title.code(),
        Some(2),
        "--title or --from-file is required"
    );
}

/// A list is paged and never carries descriptions: 70 tasks of 1 MiB descriptions (70 MiB, far
/// past any message limit) list fine, and each shows its whole description on its own.
#[test]
fn a_list_of_tasks_with_huge_descriptions_fits_in_its_messages() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let file = repo.dir.path().join("big.md");
    std::fs::write(&file, "x".repeat(1_000_000)).expect("write");
    for i in 0..70 {
        server.add(&[
            "--title",
            &format!("big {i}"),
            "--description-file",
            file.to_str().expect("utf-8"),
        ]);
    }
    let listed = server.ctl(&["task", "list", "--json"]).json();
    assert_eq!(listed.as_array().map(Vec::len), Some(70));
    let shown = server.show("t-70");
    assert_eq!(shown["description"].as_str().map(str::len), Some(1_000_000));
}

#[test]
fn task_show_history_says_each_failure_in_one_line_and_the_runs_keep_the_output() {
    let repo = TestRepo::new();
    // The server's verification (which the runners run) prints a build log and fails on the
    // task's commit (the scripted agent writes notes/), not on the base.
    let build = "! ls notes >/dev/null 2>&1 || { printf 'compiler: %s\\n' one two three four five; exit 1; }";
    let server = Server::start(
        &repo,
        &[
            "--build-cmd",
            build,
            "--max-retries",
            "2",
            "--backoff-base",
            "0",
        ],
    );
    let _r = pipeline_tests::runner(&repo, &server, "r");
    let id = server.add(&["--title", "never builds"]);
    let task = server.wait_status(&id, "needs_help");
    // Each failed verification on a runner keeps the output...
    let failed: Vec<Value> = pipeline_tests::runs(&task)
        .into_iter()
        .filter(|r| r["status"] == "failure" && r["runner"] == "r")
        .collect();
    assert_eq!(failed.len(), 2, "{task}");
    for run in &failed {
        let error = run["error"].as_str().unwrap_or_default();
        assert!(error.contains("compiler: five"), "{run}");
    }
    // ...and the history says what happened, one line an entry.
    let events = task["events"].as_array().cloned().unwrap_or_default();
    for e in &events {
        let message = e["message"].as_str().unwrap_or_default();
        assert!(!message.contains('\n'), "{e}");
        assert!(!message.contains("compiler: three"), "{e}");
    }
    let failures: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "verify_failed")
        .collect();
    assert_eq!(failures.len(), 2, "{task}");
    assert!(
        failures[0]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("attempt failed (1/2)") && m.contains("build failed")),
        "{}",
        failures[0]
    );
    let text = server.ctl(&["task", "show", &id]).ok();
    let history = text.split("\nhistory:\n").nth(1).expect("a history");
    assert_eq!(history.lines().count(), events.len(), "{history}");
}

#[test]
fn a_task_cannot_depend_on_itself() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let id = server.add(&["--title", "t"]);
    let other = server.add(&["--title", "other"]);
    let line = server
        .ctl(&["task", "depend", &id, "--on", &other, "--on", &id])
        .refused(2, &format!("task {id} cannot depend on itself"));
    assert!(!line.contains("already depends"), "{line}");
    // Refused whole: not even the other dependency was added.
    assert_eq!(server.show(&id)["depends_on"], serde_json::json!([]));
    // As for a new task.
    server
        .ctl(&[
            "task",
            "add",
            "--title",
            "s",
            "--id",
            "s",
            "--depends-on",
            "s",
        ])
        .refused(2, "task s cannot depend on itself");
}

#[test]
fn a_negative_limit_is_refused_saying_that_0_means_no_limit() {
    let repo = TestRepo::new();
    let log = Server::spawn(&mut Server::command(&repo, &["--max-retries", "-1"]))
        .err()
        .expect("refused");
    assert!(
        log.contains("--max-retries") && log.contains("0 means no limit"),
        "{log}"
    );
    assert!(!repo.state_dir().exists(), "nothing was created");
}
