//! Lost work and stuck state: what could make a task wait for ever or land nowhere. A child
//! that depends on its own epic, generated IDs that wrap, a `watch` resumed from a position
//! its server no longer has, two servers on one repository.

use std::process::{Command, Stdio};

use pipeline_tests::{Server, TestRepo, git, runner, wait_for};

/// A child may not depend on its epic (nor on a task that waits for it), nor an epic on its
/// own child: each waits for the other for ever. Refused with exit 4, whatever the way in
/// (`task add`, `task depend`, `--from-file`), and nothing is kept.
#[test]
fn a_child_cannot_depend_on_its_own_epic() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let epic = server.add(&["--title", "the epic"]);
    let sub = server.add(&["--title", "a sub-epic", "--parent", &epic]);
    let waiter = server.add(&["--title", "waits for the epic", "--depends-on", &epic]);
    for deps in [&epic, &waiter] {
        server
            .ctl(&[
                "task",
                "add",
                "--title",
                "child",
                "--parent",
                &epic,
                "--depends-on",
                deps,
            ])
            .refused(4, "would make a cycle");
    }
    server
        .ctl(&[
            "task",
            "add",
            "--title",
            "grandchild",
            "--parent",
            &sub,
            "--depends-on",
            &epic,
        ])
        .refused(4, "would make a cycle");
    let child = server.add(&["--title", "child", "--parent", &epic]);
    for (task, on) in [(&child, &epic), (&epic, &child), (&sub, &waiter)] {
        server
            .ctl(&["task", "depend", task, "--on", on])
            .refused(4, "would make a cycle");
    }
    let file = repo.dir.path().join("tasks.jsonl");
    std::fs::write(
        &file,
        format!(
            "{{\"title\": \"fine\"}}\n{{\"title\": \"bad\", \"parent\": \"{epic}\", \
             \"depends_on\": [\"{epic}\"]}}\n"
        ),
    )
    .expect("write");
    let line = server
        .ctl(&["task", "add", "--from-file", file.to_str().expect("utf-8")])
        .refused(4, "would make a cycle");
    assert!(line.contains("line 1 to 2"), "{line}");
    let listed = server.ctl(&["task", "list", "--json"]).json();
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(4),
        "nothing refused was created: {listed}"
    );
    assert_eq!(server.show(&child)["depends_on"], serde_json::json!([]));
    assert_eq!(server.show(&epic)["depends_on"], serde_json::json!([]));
    // No cycle, no refusal: a child on its sibling.
    server.ctl(&["task", "depend", &child, "--on", &sub]).ok();
}

/// Commits an empty commit with `message` on `main` of the test repository; returns it.
fn commit_on_main(repo: &TestRepo, message: &str) -> String {
    let tree = git(&repo.repo(), &["rev-parse", "main^{tree}"]);
    let commit = git(
        &repo.repo(),
        &["commit-tree", &tree, "-p", "main", "-m", message],
    );
    git(&repo.repo(), &["update-ref", "refs/heads/main", &commit]);
    commit
}

/// A repository that shows an earlier pipeline (its t-1 landed, with the server's record) and
/// a `Task-Id:` trailer at the top of u64's range: the next generated ID must not wrap to t-1
/// (which the repository says landed long ago, so the new task would be recorded done and its
/// work lost). Chosen IDs that alias generated ones, or pass the bound, are refused.
#[test]
fn generated_ids_never_wrap() {
    let repo = TestRepo::new();
    let landed = commit_on_main(&repo, "an earlier pipeline's task\n\nTask-Id: t-1");
    git(
        &repo.repo(),
        &["update-ref", "refs/pipeline/landed/t-1", &landed],
    );
    commit_on_main(
        &repo,
        "a hostile trailer\n\nTask-Id: t-18446744073709551615",
    );
    let server = Server::start(&repo, &["--accept-existing-history"]);
    let _runner = runner(&repo, &server, "r1");
    let id = server.add(&["--title", "new work"]);
    assert_ne!(id, "t-1", "the counter wrapped");
    server.wait_status(&id, "done");
    let note = git(&repo.repo(), &["show", &format!("main:notes/{id}.md")]);
    assert!(
        note.contains(&format!("task {id}")),
        "its work landed: {note}"
    );
    for alias in [
        "t-0",
        "t-01",
        "T-2",
        "t-9223372036854775808",
        "t-18446744073709551615",
    ] {
        server
            .ctl(&["task", "add", "--title", "x", "--id", alias])
            .refused(2, "the form of generated IDs");
    }
    server
        .ctl(&["task", "add", "--title", "x", "--id", "t-90"])
        .ok();
    // A trailer at the bound itself leaves no generated ID: refused, said so; chosen IDs work.
    drop(_runner);
    server.kill();
    commit_on_main(&repo, "the last ID\n\nTask-Id: t-9223372036854775807");
    let server = Server::start(&repo, &[]);
    server
        .ctl(&["task", "add", "--title", "y"])
        .refused(4, "no generated task ID is left");
    assert_eq!(server.add(&["--title", "y", "--id", "mine"]), "mine");
}

/// A `watch` that reconnects to a server whose database went back (restored from a backup)
/// named a position past the server's newest transition: it was accepted and then nothing was
/// ever delivered, not even new transitions. Now the watch says so on stderr and goes on from
/// where the server started: what happens after the restart is printed.
#[test]
fn a_watch_goes_on_after_the_servers_history_went_back() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let addr = server.addr.clone();
    server.add(&["--title", "a", "--id", "a"]);
    server.add(&["--title", "b", "--id", "b"]);
    assert!(server.terminate().success());
    // A backup (SQLite's file, or PostgreSQL's database: pipeline_tests::database).
    let backup = repo.snapshot_database("backup");

    let server = Server::start(&repo, &["--listen", &addr]);
    let out = repo.dir.path().join("watch.out");
    let err = repo.dir.path().join("watch.err");
    let mut watch = server
        .ctl_command()
        .args(["watch", "--json"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("out"))
        .stderr(std::fs::File::create(&err).expect("err"))
        .spawn()
        .expect("spawn watch");
    let printed = |id: &str| {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|t| t["task"] == id)
    };
    // Connected once it shows a transition made after it started.
    let mut n = 0;
    wait_for("watch to be connected", || {
        n += 1;
        let id = format!("c{n}");
        server.add(&["--title", "c", "--id", &id]);
        printed(&id).then_some(())
    });
    for id in ["d", "e", "f"] {
        server.add(&["--title", id, "--id", id]);
        wait_for("the watch to print it", || printed(id).then_some(()));
    }
    server.kill();
    repo.restore_database(&backup);

    let server = Server::start(&repo, &["--listen", &addr]);
    server.add(&["--title", "after the restore", "--id", "restored"]);
    wait_for("the watch to print what happened after the restart", || {
        printed("restored").then_some(())
    });
    let said = std::fs::read_to_string(&err).expect("stderr");
    assert!(
        said.contains("no longer holds the last transition shown"),
        "{said}"
    );
    server.add(&["--title", "later", "--id", "later"]);
    wait_for("the watch to go on", || printed("later").then_some(()));
    let _ = watch.kill();
    let _ = watch.wait();
}

/// `pipeline-server` on the test repository with its state in `state` (under the temp dir).
fn server_command(repo: &TestRepo, state: &str, extra: &[&str]) -> Command {
    let mut cmd = repo.command("pipeline-server");
    cmd.arg("--repo")
        .arg(repo.repo())
        .arg("--state-dir")
        .arg(repo.dir.path().join(state))
        .args(["--listen", "127.0.0.1:0", "--env-allow", "AGENT_LOG_DIR"])
        .args(extra)
        .env("RUST_LOG", "info")
        .env("PATH", pipeline_tests::scripts_path())
        .env("AGENT_LOG_DIR", repo.agent_log())
        .env_remove("PIPELINE_DB");
    cmd
}

/// The one line a server that refused to start said why in.
fn refusal(cmd: &mut Command) -> String {
    let log = match Server::spawn(cmd) {
        Ok(s) => panic!("the server started:\n{}", s.log()),
        Err(log) => log,
    };
    log.lines()
        .find(|l| l.starts_with("pipeline-server:"))
        .unwrap_or_else(|| panic!("no one-line reason: {log}"))
        .to_owned()
}

/// Two servers with their own state dirs on one repository would each take the other's
/// landings for their own (the second's t-1 recorded Done from the first's landed record, its
/// work never on the base). One server per repository: a second is refused while the first
/// runs (a lock in the repository), and a database that is not the repository's is refused
/// afterwards too, saying what to do; with --accept-existing-history it takes the repository
/// over, and then the first one is the stranger.
#[test]
fn one_repository_one_server_and_one_database() {
    let repo = TestRepo::new();
    let first = Server::spawn(&mut server_command(&repo, "state-a", &[]))
        .unwrap_or_else(|log| panic!("no server:\n{log}"));
    let line = refusal(&mut server_command(&repo, "state", &[]));
    assert!(
        line.contains("is using the repository") && line.contains(&format!("pid {}", first.pid())),
        "{line}"
    );
    let id = first.add(&["--title", "the first server's"]);
    assert_eq!(id, "t-1");
    assert!(first.terminate().success());

    let line = refusal(&mut server_command(&repo, "state", &[]));
    assert!(
        line.contains("belongs to another pipeline database")
            && line.contains("--accept-existing-history"),
        "{line}"
    );
    // The first one's own database is its repository's still (and a restart finds its task).
    let again = Server::spawn(&mut server_command(&repo, "state-a", &[]))
        .unwrap_or_else(|log| panic!("no server:\n{log}"));
    assert_eq!(again.show(&id)["status"], "open");
    assert!(again.terminate().success());

    // Taken over knowingly: the second database is the repository's now, and its work lands
    // (its state dir is the harness's, where `runner` finds the token).
    let second = Server::spawn(&mut server_command(
        &repo,
        "state",
        &["--accept-existing-history"],
    ))
    .unwrap_or_else(|log| panic!("no server:\n{log}"));
    let _runner = runner(&repo, &second, "r2");
    let mine = second.add(&["--title", "the second server's"]);
    second.wait_status(&mine, "done");
    let note = git(&repo.repo(), &["show", &format!("main:notes/{mine}.md")]);
    assert!(note.contains(&mine), "{note}");
    drop(_runner);
    assert!(second.terminate().success());
    let line = refusal(&mut server_command(&repo, "state-a", &[]));
    assert!(
        line.contains("belongs to another pipeline database"),
        "{line}"
    );
}
