//! Lost work and stuck state: what could make a task wait for ever or land nowhere. A child
//! that depends on its own epic, generated IDs that wrap, a `watch` resumed from a position
//! its server no longer has, two servers on one repository.

use pipeline_tests::{Server, TestRepo, git, runner};

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
