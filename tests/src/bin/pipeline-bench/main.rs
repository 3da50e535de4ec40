//! `pipeline-bench`: the load generator. Each benchmark starts a real release-build
//! `pipeline-server` on a temp repository and drives it over real gRPC on loopback, with
//! simulated runners (the real runner protocol, no agent) or the real `pipeline-runner`.
//! Every figure is printed as median, p99 and max, and against a floor measured in the same run
//! (a raw TCP round trip, an fsync, bare git). Run it (it builds what it needs) with:
//!
//! ```sh
//! cargo run --release -p pipeline-tests --bin pipeline-bench              # everything
//! cargo run --release -p pipeline-tests --bin pipeline-bench -- dispatch  # one benchmark
//! cargo run --release -p pipeline-tests --bin pipeline-bench -- --quick   # seconds (CI)
//! cargo run --release -p pipeline-tests --bin pipeline-bench -- train --remote-builds [--cpu-build]
//! cargo run --release -p pipeline-tests --bin pipeline-bench -- replay --repo PATH --last N --test-cmd CMD
//! ```

mod backends;
mod backlog;
mod common;
mod control;
mod dispatch;
mod e2e;
mod fleet;
mod floors;
mod from_file;
mod heartbeats;
mod integration;
mod logs;
mod million;
mod pg_floor;
mod replay;
mod train;

use pipeline_tests::TestRepo;

const BENCHMARKS: &[&str] = &[
    "dispatch",
    "leases",
    "heartbeats",
    "status",
    "integration",
    "e2e",
    "memory",
    "logs",
    "follow-memory",
    "backlog",
    "lists",
    "scale-memory",
    "metrics",
    "fleet",
    "from-file",
    "train",
    "train-30s",
    "train-early",
    "pg-floor",
    "backends",
];

/// The flags of the benchmarks (`replay` reads its own).
const FLAGS: &[&str] = &["--quick", "--remote-builds", "--cpu-build"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `replay` takes flags of its own and runs alone (it replays the repository it is given).
    if args.first().is_some_and(|a| a == "replay") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(replay::main(&args[1..]));
        println!("pipeline-bench: done");
        return;
    }
    let usage = format!(
        "usage: pipeline-bench [--quick] [--remote-builds [--cpu-build]] [BENCHMARK ...]\n       \
         pipeline-bench replay --help\nbenchmarks (all when none is named): {}",
        BENCHMARKS.join(", ")
    );
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{usage}");
        return;
    }
    // A mistyped flag would otherwise be dropped and every benchmark run at full size.
    if let Some(bad) = args
        .iter()
        .find(|a| a.starts_with('-') && !FLAGS.contains(&a.as_str()))
    {
        eprintln!("pipeline-bench: unknown flag {bad:?}\n{usage}");
        std::process::exit(2);
    }
    let quick = args.iter().any(|a| a == "--quick");
    // `train --remote-builds`: the trains built on the runners, against the server's own.
    let remote_builds = args.iter().any(|a| a == "--remote-builds");
    // `train --remote-builds --cpu-build`: the same with a CPU-bound build instead of a sleep.
    let cpu_build = args.iter().any(|a| a == "--cpu-build");
    let chosen: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    if let Some(bad) = chosen.iter().find(|c| !BENCHMARKS.contains(c)) {
        eprintln!(
            "pipeline-bench: unknown benchmark {bad:?}; choose from: {} (or: replay --repo PATH --last N --test-cmd CMD)",
            BENCHMARKS.join(", ")
        );
        std::process::exit(2);
    }
    let run: Vec<&str> = if chosen.is_empty() {
        BENCHMARKS.to_vec()
    } else {
        chosen
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "pipeline-bench{} on {} cores: {}",
        if quick { " --quick" } else { "" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        run.join(", ")
    );
    rt.block_on(async {
        let scratch = TestRepo::new();
        let floors = floors::measure(scratch.dir.path(), &scratch.repo(), quick).await;
        for what in run {
            match what {
                "dispatch" => dispatch::latency(&floors, quick).await,
                "leases" => {
                    dispatch::throughput(
                        "one transaction per lease",
                        &["--dispatch-batch", "1"],
                        ">= 2,500 leases/s",
                        quick,
                    )
                    .await;
                    dispatch::throughput("batched commits", &[], ">= 10,000 leases/s", quick).await;
                }
                "heartbeats" => heartbeats::heartbeats(quick).await,
                "status" => control::status(&floors, quick).await,
                "integration" => integration::integration(&floors, quick).await,
                "e2e" => e2e::e2e(quick).await,
                "memory" => control::memory(quick).await,
                "logs" => logs::logs(quick).await,
                "follow-memory" => logs::follow_memory(quick).await,
                "backlog" => backlog::backlog(quick).await,
                "lists" => million::lists(quick).await,
                "scale-memory" => million::scale_memory(quick).await,
                "metrics" => million::metrics(quick).await,
                "fleet" => fleet::fleet(quick).await,
                "from-file" => from_file::from_file(quick).await,
                "train" if remote_builds => train::remote(quick, cpu_build).await,
                "train" => train::train(quick).await,
                "train-30s" => train::train_30s(quick).await,
                "train-early" => train::train_early(quick).await,
                "pg-floor" => pg_floor::pg_floor(quick).await,
                "backends" => backends::backends(quick).await,
                _ => unreachable!("checked above"),
            }
        }
    });
    println!("pipeline-bench: done");
}
