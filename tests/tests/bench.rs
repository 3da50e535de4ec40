//! The short form of the benchmark harness, so that it cannot rot: `pipeline-bench --quick`
//! runs every benchmark at a small size against the real binaries. It checks that each one ran
//! and printed its figures, never how fast they were.

use std::process::Command;

#[test]
fn the_benchmark_harness_runs_every_benchmark() {
    if pipeline_tests::runs_the_same_on_both_passes("the benchmarks pick their databases, both") {
        return;
    }
    pipeline_tests::ensure_built();
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline-bench"))
        .arg("--quick")
        // The benchmarks choose their databases themselves (some seed the SQLite file).
        .env_remove("PIPELINE_TEST_DB")
        .output()
        .expect("run pipeline-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pipeline-bench --quick failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for figure in [
        "floor: raw TCP round trip",
        "floor: fsync",
        "floor: one git spawn",
        "dispatch latency:",
        "lease throughput, one transaction per lease:",
        "lease throughput, batched commits:",
        "heartbeats, 100 runners at 1/s: server CPU",
        "dead runner detected:",
        "control RPC status, one caller (like pipelinectl)",
        "the same from a caller on a multi-threaded runtime",
        "control RPC status, 64 concurrent callers",
        "floor: bare git per integration",
        "integration, one at a time:",
        "integrations/s",
        "floor: bare git + the same agent per task",
        "end to end, real runner",
        "memory: server RSS",
        "logs ingest, one sender",
        "logs follow latency",
        "logs, one stalled follower: server peak",
        "backlog, no backlog: created -> leased",
        "backlog, no backlog: server CPU per task",
        "blocked open tasks: created -> leased",
        "blocked open tasks: server CPU per task",
        "done tasks: created -> leased",
        "done tasks: server CPU per task",
        "ListTasks, a page of 100 of",
        "ListTasks, a full walk of",
        "scale memory: server RSS",
        "scale memory: pipelinectl listing all",
        "metrics: GET /metrics with",
        "runners heartbeating every",
        "task add --from-file,",
        "landed/min (last unmarked at",
        "red trees on the base, B = ",
        "floor: PostgreSQL single-row INSERT + commit",
        "floor: PostgreSQL claim loop",
        "backend: postgres",
        "postgres: dispatch latency",
        "lease throughput, postgres, one transaction per lease:",
        "lease throughput, postgres, batched commits:",
        "postgres: task creation",
        "pipeline-bench: done",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.contains(figure))
            .unwrap_or_else(|| panic!("no {figure:?} in:\n{stdout}"));
        // Every figure line carries numbers (a median or a rate), not a placeholder; two lines
        // are headings, not figures: the end, and the backends' section heading.
        if figure != "pipeline-bench: done" && !figure.starts_with("backend: ") {
            assert!(
                line.chars().any(|c| c.is_ascii_digit()),
                "{figure}: no figure in {line:?}"
            );
        }
    }
    let unknown = Command::new(env!("CARGO_BIN_EXE_pipeline-bench"))
        .arg("nonsense")
        .output()
        .expect("run pipeline-bench");
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown benchmark \"nonsense\""));
}

/// A small history to replay: a test script in the tree (red when a file says BAD), changes
/// that touch the same file (so a change made on an older base is merged into a newer one),
/// an executable, a deletion, and a merge commit on the first-parent line.
fn replayable_history(dir: &std::path::Path) -> std::path::PathBuf {
    let repo = dir.join("src");
    std::fs::create_dir(&repo).expect("mkdir");
    let git = |args: &[&str]| pipeline_tests::git(&repo, args);
    let write = |name: &str, text: &str| std::fs::write(repo.join(name), text).expect("write");
    let commit = |subject: &str| {
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", subject]);
    };
    git(&["init", "-q", "-b", "main"]);
    write(
        "check.sh",
        "#!/bin/sh\n! grep -rl BAD --exclude=check.sh .\n",
    );
    write("shared.txt", "a\nb\nc\nd\ne\nf\ng\nh\n");
    write("old.txt", "old\n");
    commit("initial");
    for i in 1..=3 {
        write(&format!("f{i}.txt"), &format!("{i}\n"));
        commit(&format!("add f{i}"));
    }
    write("shared.txt", "a\nB\nc\nd\ne\nf\ng\nh\n");
    commit("shared: b");
    write("shared.txt", "a\nB\nc\nd\ne\nf\nG\nh\n");
    commit("shared: g");
    write("run.sh", "#!/bin/sh\necho run\n");
    git(&["add", "run.sh"]);
    git(&["update-index", "--chmod=+x", "run.sh"]);
    commit("an executable");
    git(&["checkout", "-q", "-b", "side"]);
    write("side.txt", "side\n");
    commit("on the side");
    git(&["checkout", "-q", "main"]);
    write("m.txt", "m\n");
    commit("m");
    git(&["merge", "-q", "--no-ff", "side", "-m", "merge side"]);
    // A file of the first base: removing one the range added (f1) would land before or after
    // its adding, as the runners finish.
    git(&["rm", "-q", "old.txt"]);
    commit("remove old");
    repo
}

/// `pipeline-bench replay` on a small generated history, so that it cannot rot: every change
/// lands, the final tree is the original's, and no commit the base passed through is red; bad
/// input is refused in one line.
#[test]
fn replay_lands_a_real_history_and_refuses_bad_input() {
    pipeline_tests::ensure_built();
    let dir = tempfile::tempdir().expect("temp dir");
    let repo = replayable_history(dir.path());
    let bench = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pipeline-bench"))
            .arg("replay")
            .args(args)
            .env_remove("PIPELINE_TEST_DB")
            .output()
            .expect("run pipeline-bench replay")
    };
    let src = repo.to_str().expect("utf-8");
    let out = bench(&[
        "--repo",
        src,
        "--last",
        "9",
        "--test-cmd",
        "sh check.sh",
        "--runners",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "replay failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "replay: 9 changes of",
        "replay: 1 of the 9 changes are merge commits: each is replayed as one change, its diff against its first parent",
        "replay: 9 of 9 landed in",
        "integration builds per landed change",
        "replay: final tree equals the original's: yes",
        "replay: green base: 0 of 9 commits the base passed through are red",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }

    let not_a_repo = dir.path().join("plain");
    std::fs::create_dir(&not_a_repo).expect("mkdir");
    for (args, says) in [
        (
            vec![
                "--repo",
                not_a_repo.to_str().expect("utf-8"),
                "--last",
                "2",
                "--test-cmd",
                "true",
            ],
            "is not a git repository",
        ),
        (
            vec!["--repo", src, "--last", "11", "--test-cmd", "true"],
            "--last 11: ",
        ),
        (
            vec!["--repo", src, "--last", "2"],
            "--test-cmd CMD is missing",
        ),
    ] {
        let out = bench(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// A test command that fails on the range's base itself: the server holds everything (nothing
/// lands on a red base), and the replay stops at once, saying so in one line (exit 2). It used
/// to wait out its whole limit (10 minutes and more by default), then exit 0 with "0 of N
/// landed".
#[test]
fn replay_with_a_test_command_red_on_the_base_stops_at_once_saying_so() {
    pipeline_tests::ensure_built();
    let dir = tempfile::tempdir().expect("temp dir");
    let repo = replayable_history(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline-bench"))
        .arg("replay")
        .args(["--repo", repo.to_str().expect("utf-8"), "--last", "2"])
        .args(["--test-cmd", "false", "--runners", "1"])
        // The old code's end, so that this test fails rather than hangs on it.
        .args(["--timeout", "90"])
        .env_remove("PIPELINE_TEST_DB")
        .output()
        .expect("run pipeline-bench replay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "stdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("the test command fails on the base itself"),
        "{stderr}"
    );
}

/// A mistyped flag is refused (it was dropped, and every benchmark ran at full size, for
/// minutes); `--help` says what there is and runs nothing.
#[test]
fn a_mistyped_flag_is_refused_and_help_runs_nothing() {
    let bench = || Command::new(env!("CARGO_BIN_EXE_pipeline-bench"));
    let out = bench().arg("--quik").output().expect("run pipeline-bench");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.starts_with("pipeline-bench: unknown flag \"--quik\""),
        "{said}"
    );
    assert!(out.stdout.is_empty(), "nothing ran: {out:?}");
    let out = bench().arg("--help").output().expect("run pipeline-bench");
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("usage: pipeline-bench"), "{said}");
    assert!(
        said.contains("train-30s"),
        "the benchmarks are listed: {said}"
    );
}
