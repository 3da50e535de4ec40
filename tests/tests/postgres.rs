//! PostgreSQL, the real server the tests start themselves (`pipeline_core::pgtest`), used
//! through sqlx as the PostgreSQL backend (issue 28) will use it.
//!
//! The change feed's positions must never let a reader skip an entry under concurrent writers:
//! a reader that remembers the last position it read and asks for `WHERE pos > last` must find
//! every entry. Positions from a sequence do not give that (one writer may take 1, another 2 and
//! commit first: a reader sees 2, and 1 commits behind it); positions from a one-row counter
//! taken in the writer's transaction (`UPDATE feed_head SET pos = pos + 1 RETURNING pos`) do,
//! since the counter's row lock is held to commit: the next writer waits for it, so positions
//! commit in their order. Both are shown here, the second also under many writers at once.

use std::time::{Duration, Instant};

use pipeline_core::pgtest::PgServer;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection, Row};

async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(16)
        .connect(url)
        .await
        .expect("connect to the test PostgreSQL")
}

async fn schema(pool: &PgPool) {
    pool.execute(
        "CREATE TABLE feed_head (pos BIGINT NOT NULL);
         INSERT INTO feed_head VALUES (0);
         CREATE SEQUENCE feed_seq;
         CREATE TABLE feed (pos BIGINT PRIMARY KEY, writer INT NOT NULL)",
    )
    .await
    .expect("schema");
}

/// The positions after `last`, in order.
async fn read_after(pool: &PgPool, last: i64) -> Vec<i64> {
    sqlx::query_scalar("SELECT pos FROM feed WHERE pos > $1 ORDER BY pos")
        .bind(last)
        .fetch_all(pool)
        .await
        .expect("read the feed")
}

/// Waits, with a deadline, until `n` sessions of this database wait on a lock.
async fn wait_lock_waiters(pool: &PgPool, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity");
        if waiting >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no writer came to wait on the lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_lets_a_reader_skip_an_entry_the_one_row_counter_does_not() {
    if pipeline_tests::runs_the_same_on_both_passes("on PostgreSQL anyway") {
        return;
    }
    let db = PgServer::shared().database();
    let pool = pool(db.url()).await;
    schema(&pool).await;

    // A sequence: the first writer takes 1, the second 2 and commits first.
    let mut first = PgConnection::connect(db.url()).await.expect("connect");
    let mut second = PgConnection::connect(db.url()).await.expect("connect");
    let mut a = first.begin().await.expect("begin");
    let one: i64 =
        sqlx::query_scalar("INSERT INTO feed SELECT nextval('feed_seq'), 1 RETURNING pos")
            .fetch_one(&mut *a)
            .await
            .expect("insert");
    let mut b = second.begin().await.expect("begin");
    let two: i64 =
        sqlx::query_scalar("INSERT INTO feed SELECT nextval('feed_seq'), 2 RETURNING pos")
            .fetch_one(&mut *b)
            .await
            .expect("insert");
    assert_eq!((one, two), (1, 2));
    b.commit().await.expect("commit");
    let seen = read_after(&pool, 0).await;
    assert_eq!(seen, [2], "the reader sees 2 before 1 is committed");
    a.commit().await.expect("commit");
    assert!(
        read_after(&pool, 2).await.is_empty(),
        "reading after 2, the reader never sees 1: skipped"
    );
    pool.execute("TRUNCATE feed").await.expect("truncate");

    // The one-row counter: the second writer waits for the first to commit.
    let mut a = first.begin().await.expect("begin");
    let one: i64 = sqlx::query_scalar("UPDATE feed_head SET pos = pos + 1 RETURNING pos")
        .fetch_one(&mut *a)
        .await
        .expect("take a position");
    sqlx::query("INSERT INTO feed VALUES ($1, 1)")
        .bind(one)
        .execute(&mut *a)
        .await
        .expect("insert");
    let writer = tokio::spawn(async move {
        let mut b = second.begin().await.expect("begin");
        let two: i64 = sqlx::query_scalar("UPDATE feed_head SET pos = pos + 1 RETURNING pos")
            .fetch_one(&mut *b)
            .await
            .expect("take a position");
        sqlx::query("INSERT INTO feed VALUES ($1, 2)")
            .bind(two)
            .execute(&mut *b)
            .await
            .expect("insert");
        b.commit().await.expect("commit");
        two
    });
    wait_lock_waiters(&pool, 1).await;
    assert!(
        read_after(&pool, 0).await.is_empty(),
        "nothing is visible while the first writer holds the counter"
    );
    a.commit().await.expect("commit");
    let two = writer.await.expect("the second writer");
    assert_eq!((one, two), (1, 2));
    assert_eq!(read_after(&pool, 0).await, [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_from_the_one_row_counter_commit_in_order_under_concurrent_writers() {
    if pipeline_tests::runs_the_same_on_both_passes("on PostgreSQL anyway") {
        return;
    }
    const WRITERS: i32 = 8;
    const EACH: i64 = 40;
    let db = PgServer::shared().database();
    let pool = pool(db.url()).await;
    schema(&pool).await;

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for _ in 0..EACH {
                    let mut tx = pool.begin().await.expect("begin");
                    let pos: i64 =
                        sqlx::query_scalar("UPDATE feed_head SET pos = pos + 1 RETURNING pos")
                            .fetch_one(&mut *tx)
                            .await
                            .expect("take a position");
                    sqlx::query("INSERT INTO feed VALUES ($1, $2)")
                        .bind(pos)
                        .bind(w)
                        .execute(&mut *tx)
                        .await
                        .expect("insert");
                    tx.commit().await.expect("commit");
                }
            })
        })
        .collect();

    // The reader reads after the last position it saw, as a feed's follower does, while the
    // writers write; every read must go on exactly where the last one stopped.
    let total = i64::from(WRITERS) * EACH;
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while last < total {
        let got = read_after(&pool, last).await;
        for pos in got {
            assert_eq!(pos, last + 1, "the reader skipped from {last} to {pos}");
            last = pos;
        }
        assert!(Instant::now() < deadline, "the writers did not finish");
        tokio::task::yield_now().await;
    }
    for writer in writers {
        writer.await.expect("a writer");
    }
    let count: i64 = sqlx::query("SELECT count(*) AS n FROM feed")
        .fetch_one(&pool)
        .await
        .expect("count")
        .get("n");
    assert_eq!(count, total);
}

/// `pipeline-server --db postgres://…` keeps its state in PostgreSQL: its schema is made at
/// start, a task added is there after the server is SIGKILLed and started again on the same
/// database, and the change feed goes on from where it was.
#[test]
fn a_server_on_postgres_keeps_its_state_across_a_kill() {
    if pipeline_tests::runs_the_same_on_both_passes("on PostgreSQL anyway") {
        return;
    }
    use pipeline_tests::{Server, TestRepo};
    let repo = TestRepo::new();
    let db = PgServer::shared().database();
    let server = Server::start(&repo, &["--db", db.url()]);
    let id = server.add(&["--title", "first on postgres"]);
    let before = server.show(&id);
    assert_eq!(before["status"], "open");
    drop(server); // SIGKILL
    let tables = PgServer::shared()
        .psql(db.name(), "SELECT count(*) FROM tasks")
        .expect("psql");
    assert_eq!(tables, "1", "the task is in PostgreSQL");
    let again = Server::start(&repo, &["--db", db.url()]);
    let after = again.show(&id);
    assert_eq!(after["title"], "first on postgres");
    assert_eq!(after["status"], "open");
    let next = again.add(&["--title", "second"]);
    assert_ne!(next, id, "no generated ID is used twice");
}

/// A PostgreSQL that cannot be reached stops the server at start with one line naming the URL
/// (without its password) and what to check; nothing is served.
#[test]
fn a_server_refuses_an_unreachable_postgres_in_one_line() {
    if pipeline_tests::runs_the_same_on_both_passes("on PostgreSQL anyway") {
        return;
    }
    use pipeline_tests::{Server, TestRepo, run};
    let repo = TestRepo::new();
    let nowhere = tempfile::tempdir().expect("temp dir");
    let url = format!(
        "postgres://ann:secret@localhost/pipeline?host={}",
        nowhere.path().display()
    );
    let out = run(&mut Server::command(&repo, &["--db", &url]));
    assert_ne!(out.code(), Some(0), "{}", out.stderr);
    let last = out
        .stderr
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
    assert!(
        last.starts_with("pipeline-server: --db postgres://ann:***@"),
        "{}",
        out.stderr
    );
    assert!(last.contains("is PostgreSQL running"), "{}", out.stderr);
    assert!(!out.stderr.contains("secret"), "{}", out.stderr);
}
