//! `pipelinectl task add --from-file` (issues 16 and 30): the real release `pipelinectl`
//! creates the tasks of a JSON-lines file (a title, a one-line description and a priority
//! each) in batches of 1,000, each one `CreateTasks` call, all or none; the figure is the
//! tasks per second from starting the process to its exit, IDs printed. Two files in the same
//! run, each on a server of its own: the tasks alone, and the same tasks each depending on one
//! task (the file's first line), so that what a dependency costs shows as the ratio of the two
//! rates (goal: with dependencies at least 0.8 of the rate without).

use std::fmt::Write as _;
use std::process::Stdio;

use pipeline_tests::{Server, TestRepo};

use crate::common::{Admin, run_watching_memory, verdict};
use crate::dispatch::SERVER_FLAGS;

/// Creates `n` tasks (plus, with `depend`, the one they all depend on, first) from a file on a
/// fresh server; returns (tasks per second, pipelinectl's peak RSS, seconds).
async fn one_file(n: usize, depend: bool) -> (f64, u64, f64) {
    let repo = TestRepo::new();
    let server = Server::start(&repo, SERVER_FLAGS);
    let file = repo.dir.path().join("tasks.jsonl");
    let mut lines = String::new();
    if depend {
        lines.push_str(r#"{"id": "base", "title": "the task the others depend on"}"#);
        lines.push('\n');
    }
    let deps = if depend {
        r#", "depends_on": ["base"]"#
    } else {
        ""
    };
    for i in 0..n {
        writeln!(
            lines,
            r#"{{"title": "from the file, task {i}", "description": "Change the greeting in README to say hello to number {i}, and nothing else.", "priority": {}{deps}}}"#,
            i % 5
        )
        .expect("format");
    }
    std::fs::write(&file, lines).expect("write the tasks file");
    let ids = repo.dir.path().join("ids.txt");
    let url = server.url.clone();
    let (path, out) = (file.clone(), ids.clone());
    let (exit, peak, wall) = tokio::task::spawn_blocking(move || {
        run_watching_memory(
            pipeline_tests::ctl_command(&pipeline_tests::home_for(&url), &url)
                .args(["task", "add", "--from-file"])
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&out).expect("the IDs file"))
                .stderr(Stdio::null()),
        )
    })
    .await
    .expect("pipelinectl");
    assert!(
        exit.success(),
        "pipelinectl task add --from-file failed: {exit}"
    );
    let total = n + usize::from(depend);
    let printed = std::fs::read_to_string(&ids).expect("read the IDs");
    assert_eq!(printed.lines().count(), total, "one ID a task");
    let status = Admin::connect(&server.url, repo.admin_token())
        .await
        .status()
        .await;
    assert_eq!(status.open, total as u64, "every task was created");
    (total as f64 / wall.as_secs_f64(), peak, wall.as_secs_f64())
}

pub async fn from_file(quick: bool) {
    let n = if quick { 5_000 } else { 100_000 };
    let (rate, peak, secs) = one_file(n, false).await;
    println!(
        "task add --from-file, {n} tasks through the release pipelinectl: {secs:.2} s = {rate:.0} tasks/s (pipelinectl peak RSS {:.1} MB)  [goal: >= 10,000 tasks/s: {}]",
        peak as f64 / 1e6,
        verdict(rate >= 10_000.0)
    );
    let n = n / 2;
    let (alone, _, _) = one_file(n, false).await;
    let (with_deps, _, secs) = one_file(n, true).await;
    let ratio = with_deps / alone;
    println!(
        "task add --from-file, {n} tasks each depending on one task: {secs:.2} s = {with_deps:.0} tasks/s, against {alone:.0} tasks/s without (x{ratio:.2})  [goal: >= 0.8x: {}]",
        verdict(ratio >= 0.8)
    );
}
