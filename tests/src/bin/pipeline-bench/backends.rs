//! The two backends side by side (issue 28): the same figures with the server on SQLite (its
//! file in the state dir, as by default) and on PostgreSQL (a server of its own started by
//! `pipeline_core::pgtest`, `fsync` on as an operator runs it, a fresh database for each
//! figure, reached over its Unix socket), after PostgreSQL's own floor measured in the same run
//! (`pg-floor`: a single-row INSERT + commit, a bare claim loop). Each section starts with a
//! `backend:` line naming the backend its figures are for. Goals (issue 28): leases/s on
//! PostgreSQL >= 80% of the bare claim loop; a page of 100 of a million tasks <= 10 ms.

use std::time::Instant;

use pipeline_core::pgtest::{Options, PgServer};
use pipeline_tests::{Server, TestRepo};

use crate::common::{Admin, report};
use crate::dispatch::SERVER_FLAGS;

pub async fn backends(quick: bool) {
    crate::pg_floor::pg_floor(quick).await;
    let pg = PgServer::start(Options { fsync: true }).unwrap_or_else(|e| panic!("{e}"));
    // `PIPELINE_BENCH_BACKENDS=postgres` (or `sqlite`) measures one backend only.
    let only = std::env::var("PIPELINE_BENCH_BACKENDS").unwrap_or_default();
    // `PIPELINE_BENCH_FIGURES=leases,lists` (of latency, leases, creation, logs, lists)
    // measures those figures only; unset, all.
    let figures = std::env::var("PIPELINE_BENCH_FIGURES").unwrap_or_default();
    let wanted = |figure: &str| figures.is_empty() || figures.split(',').any(|f| f == figure);
    for backend in ["sqlite", "postgres"] {
        if !only.is_empty() && !only.split(',').any(|b| b == backend) {
            continue;
        }
        println!("backend: {backend}");
        // Each figure on a database of its own (SQLite: the repository's state dir).
        let db = || (backend == "postgres").then(|| pg.database());

        if wanted("latency") {
            let one = db();
            let extra: Vec<&str> = one.iter().flat_map(|d| ["--db", d.url()]).collect();
            latency(backend, &extra, quick).await;
        }

        if wanted("leases") {
            let one = db();
            let mut extra: Vec<&str> = one.iter().flat_map(|d| ["--db", d.url()]).collect();
            extra.extend(["--dispatch-batch", "1"]);
            crate::dispatch::throughput(
                &format!("{backend}, one transaction per lease"),
                &extra,
                "postgres >= 80% of the claim loop's claims/s",
                quick,
            )
            .await;
            let one = db();
            let extra: Vec<&str> = one.iter().flat_map(|d| ["--db", d.url()]).collect();
            crate::dispatch::throughput(
                &format!("{backend}, batched commits"),
                &extra,
                "postgres >= 80% of the claim loop's claims/s",
                quick,
            )
            .await;
        }

        if wanted("creation") {
            let one = db();
            let extra: Vec<&str> = one.iter().flat_map(|d| ["--db", d.url()]).collect();
            creation(backend, &extra, quick).await;
        }

        if wanted("logs") {
            let one = db();
            let extra: Vec<&str> = one.iter().flat_map(|d| ["--db", d.url()]).collect();
            let repo = TestRepo::new();
            let mut flags = SERVER_FLAGS.to_vec();
            flags.extend_from_slice(&extra);
            let server = Server::start(&repo, &flags);
            crate::logs::bench_logs(&server, &repo, quick).await;
            drop(server);
        }

        if wanted("lists") {
            let one = db();
            let extra: Vec<&str> = one.iter().flat_map(|d| ["--db", d.url()]).collect();
            crate::million::lists_with(quick, &extra).await;
        }
    }
}

/// Dispatch latency on the backend `extra` names.
async fn latency(backend: &str, extra: &[&str], quick: bool) {
    let repo = TestRepo::new();
    let mut flags = SERVER_FLAGS.to_vec();
    flags.extend_from_slice(extra);
    let server = Server::start(&repo, &flags);
    let n: usize = if quick { 100 } else { 1_000 };
    report(
        &format!(
            "{backend}: dispatch latency: create task sent -> its lease pushed to an idle runner"
        ),
        crate::dispatch::created_to_leased(&server, &repo, n, "d").await,
        None,
        "p50 <= 2 ms, p99 <= 10 ms",
    );
}

/// Task creation, one `CreateTask` a call, 16 callers at once.
async fn creation(backend: &str, extra: &[&str], quick: bool) {
    let repo = TestRepo::new();
    let mut flags = SERVER_FLAGS.to_vec();
    flags.extend_from_slice(extra);
    let server = Server::start(&repo, &flags);
    let admin = Admin::connect(&server.url, repo.admin_token()).await;
    let n = if quick { 1_000 } else { 20_000 };
    admin.create_many(100, 16, "warm").await;
    let start = Instant::now();
    let ids = admin.create_many(n, 16, "create").await;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(ids.len(), n);
    println!(
        "{backend}: task creation, CreateTask from 16 callers at once: {n} tasks in {secs:.2} s = {:.0} tasks/s  [goal: -]",
        n as f64 / secs
    );
}
