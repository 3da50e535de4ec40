//! PostgreSQL's own floor (issue 28: each Postgres figure "against Postgres's own floor
//! measured in the same run"): a real PostgreSQL started by `pipeline_core::pgtest` on a temp
//! dir, reached over its Unix socket through sqlx as the backend will reach it, with `fsync`
//! on (a durable server, as an operator runs it). Two figures:
//!
//! - a single-row `INSERT` and its commit, one round trip each, from one connection;
//! - a bare claim loop, the least a lease can cost on PostgreSQL: `CLAIMERS` connections each
//!   taking the first unclaimed of `ROWS` rows with `SELECT … FOR UPDATE SKIP LOCKED` and
//!   marking it claimed with an `UPDATE`, one transaction per claim, until none is left.

use std::time::{Duration, Instant};

use pipeline_core::pgtest::{Options, PgServer};
use sqlx::Executor;
use sqlx::postgres::PgPoolOptions;

use crate::common::Summary;

const CLAIMERS: usize = 8;

pub async fn pg_floor(quick: bool) {
    let server = PgServer::start(Options { fsync: true }).unwrap_or_else(|e| panic!("{e}"));
    let db = server.database();
    let pool = PgPoolOptions::new()
        .max_connections(CLAIMERS as u32 + 1)
        .connect(db.url())
        .await
        .expect("connect to PostgreSQL");
    pool.execute(
        "CREATE TABLE floor_insert (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL);
         CREATE TABLE floor_claims (id BIGINT PRIMARY KEY, claimed BOOLEAN NOT NULL,
                                    epoch BIGINT NOT NULL);
         CREATE INDEX floor_claims_free ON floor_claims (id) WHERE NOT claimed",
    )
    .await
    .expect("the floor's tables");

    let inserts = if quick { 200 } else { 5_000 };
    let mut conn = pool.acquire().await.expect("a connection");
    let mut samples = Vec::with_capacity(inserts);
    let start = Instant::now();
    for i in 0..inserts {
        let one = Instant::now();
        sqlx::query("INSERT INTO floor_insert (body) VALUES ($1)")
            .bind(format!("row {i}"))
            .execute(&mut *conn)
            .await
            .expect("insert");
        samples.push(one.elapsed());
    }
    line(
        "floor: PostgreSQL single-row INSERT + commit, one connection",
        samples,
        start.elapsed(),
        "inserts/s",
    );
    drop(conn);

    let rows: i64 = if quick { 1_000 } else { 20_000 };
    sqlx::query("INSERT INTO floor_claims SELECT g, false, 0 FROM generate_series(1, $1) AS g")
        .bind(rows)
        .execute(&pool)
        .await
        .expect("the rows to claim");
    pool.execute("VACUUM ANALYZE floor_claims")
        .await
        .expect("vacuum");
    let start = Instant::now();
    let claimers: Vec<_> = (0..CLAIMERS)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut conn = pool.acquire().await.expect("a connection");
                let mut samples = Vec::new();
                loop {
                    let one = Instant::now();
                    let mut tx = sqlx::Connection::begin(&mut *conn).await.expect("begin");
                    let id: Option<i64> = sqlx::query_scalar(
                        "SELECT id FROM floor_claims WHERE NOT claimed ORDER BY id LIMIT 1
                         FOR UPDATE SKIP LOCKED",
                    )
                    .fetch_optional(&mut *tx)
                    .await
                    .expect("claim");
                    let Some(id) = id else { break };
                    sqlx::query(
                        "UPDATE floor_claims SET claimed = true, epoch = epoch + 1 WHERE id = $1",
                    )
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .expect("mark claimed");
                    tx.commit().await.expect("commit");
                    samples.push(one.elapsed());
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for claimer in claimers {
        samples.extend(claimer.await.expect("a claimer"));
    }
    let elapsed = start.elapsed();
    assert_eq!(samples.len() as i64, rows, "every row claimed once");
    line(
        &format!(
            "floor: PostgreSQL claim loop (SELECT … FOR UPDATE SKIP LOCKED + UPDATE), {CLAIMERS} claimers over {rows} rows"
        ),
        samples,
        elapsed,
        "claims/s",
    );
}

/// One figure line: the per-operation distribution and the rate over the whole run.
fn line(name: &str, samples: Vec<Duration>, elapsed: Duration, unit: &str) {
    let n = samples.len();
    println!(
        "{name}: {}; {:.0} {unit}  [goal: - (the floor)]",
        Summary::of(samples),
        n as f64 / elapsed.as_secs_f64()
    );
}
