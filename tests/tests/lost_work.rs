//! Lost work and stuck state: what could make a task wait for ever or land nowhere. A child
//! that depends on its own epic, generated IDs that wrap, a `watch` resumed from a position
//! its server no longer has, two servers on one repository.

use pipeline_tests::{Server, TestRepo};

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
