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
