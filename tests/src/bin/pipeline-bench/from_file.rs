//! `pipelinectl task add --from-file` (issue 16): the real release `pipelinectl` creates the
//! tasks of a JSON-lines file (a title, a one-line description and a priority each) in batches
//! of 1,000, each one `CreateTasks` call, all or none; the figure is the tasks per second from
//! starting the process to its exit, IDs printed.

use std::fmt::Write as _;
use std::process::Stdio;

use pipeline_tests::{Server, TestRepo};

use crate::common::{Admin, run_watching_memory, verdict};
use crate::dispatch::SERVER_FLAGS;

pub async fn from_file(quick: bool) {
    let n = if quick { 5_000 } else { 100_000 };
    let repo = TestRepo::new();
    let server = Server::start(&repo, SERVER_FLAGS);
    let file = repo.dir.path().join("tasks.jsonl");
    let mut lines = String::new();
    for i in 0..n {
        writeln!(
            lines,
            r#"{{"title": "from the file, task {i}", "description": "Change the greeting in README to say hello to number {i}, and nothing else.", "priority": {}}}"#,
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
    let printed = std::fs::read_to_string(&ids).expect("read the IDs");
    assert_eq!(printed.lines().count(), n, "one ID a task");
    let status = Admin::connect(&server.url, repo.admin_token())
        .await
        .status()
        .await;
    assert_eq!(status.open, n as u64, "every task was created");
    let rate = n as f64 / wall.as_secs_f64();
    println!(
        "task add --from-file, {n} tasks through the release pipelinectl: {:.2} s = {rate:.0} tasks/s (pipelinectl peak RSS {:.1} MB)  [goal: >= 10,000 tasks/s: {}]",
        wall.as_secs_f64(),
        peak as f64 / 1e6,
        verdict(rate >= 10_000.0)
    );
}
