//! The SQLite [`Store`]: one file, WAL, `synchronous = NORMAL`, foreign keys on, a busy timeout,
//! migrations from `migrations/sqlite` run at open, and `BEGIN IMMEDIATE` for every write
//! transaction (a deferred transaction that reads then writes fails with `SQLITE_BUSY` instead of
//! waiting for the lock). Write transactions take turns at an in-process queue before they
//! begin: two writers never meet at SQLite's lock, whose busy handler waits by sleeping (1 ms
//! and up), and readers (WAL) never wait for writers. A write that is dropped before it ends
//! keeps its turn until its connection is rolled back and closed (`WriteTx`).
//!
//! This module holds the pool and the write turn, and the [`Store`] impl, each method handed
//! to the module of its concern: `tasks` (creating, reading, listing, editing, pausing tasks
//! and adding dependencies), `commit` (the compare-and-swap write of a transition), `runs`,
//! `events` (the change feed: task history and the other topics' entries), `trains` (merge trains and the journal of base moves), `logs`,
//! `meta` (server facts and the generated-ID counter), `sessions` (the web page's). Below them
//! `reads` (the plan's reads, [`crate::store::plan::Reads`], in SQL), `graph` (what a task
//! waits for, its ancestors), `rows` (row types, columns, decoding) and `errors` (SQLite's
//! errors as the domain's [`Error`], mapped at this edge).

mod commit;
mod errors;
mod events;
mod graph;
mod logs;
mod meta;
mod reads;
mod rows;
mod runs;
mod sessions;
mod tasks;
mod trains;
mod webhooks;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, SqliteConnection};

use super::{
    Committed, EndSessions, Journal, NewEvent, NewRun, RunEnd, SessionRecord, Store, TaskFilter,
    TaskWrite, TrainEnd, TrainStat, UsageBucket, WebhookCursor,
};
use crate::domain::{
    LogLine, Millis, NewTask, Phase, Run, StatusCounts, Task, TaskEdit, TaskEvent, TaskId,
    TaskStatus,
};
use crate::error::{Error, Result};
use crate::feed::{Feed, FeedEntry, NewEntry};
use pipeline_core::ids::CommitId;

/// A task store in one SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One write transaction at a time, in arrival order.
    writer: Arc<tokio::sync::Mutex<()>>,
    /// Why the last write failed, until one succeeds again (for the server's health).
    write_failure: Arc<std::sync::Mutex<Option<String>>>,
    /// The change feed's broadcast and the newest position published on it.
    feed: Publisher,
}

/// What publishes the feed's entries: after each write commits, while it still holds the
/// write turn, the entries after the newest one published are read on its connection and
/// sent in position order. Positions are the table's `AUTOINCREMENT` IDs, given by the one
/// writer in commit order, so publication follows commit order and no follower sees a
/// position before one that precedes it. Entries a failed read left unpublished go out with
/// the next write (and followers catch up from storage when behind or when they see a gap).
#[derive(Clone)]
struct Publisher {
    feed: Feed,
    published: Arc<std::sync::atomic::AtomicI64>,
}

impl Publisher {
    /// Publishes what the last transaction (and any before it left unpublished) recorded.
    async fn publish(&self, conn: &mut SqliteConnection) {
        use std::sync::atomic::Ordering;
        let after = self.published.load(Ordering::Acquire);
        let rows = match events::unpublished(conn, after).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "reading the feed's new entries to publish them");
                return;
            }
        };
        for row in rows {
            let position = row.id;
            match row.into_entry() {
                Ok(entry) => self.feed.publish(entry),
                Err(e) => tracing::warn!(position, "a feed entry that cannot be read: {e}"),
            }
            self.published.store(position, Ordering::Release);
        }
    }
}

/// A write transaction holding the store's write turn until it ends. It is begun, committed
/// and rolled back by hand (`BEGIN IMMEDIATE`, `COMMIT`, `ROLLBACK`), and a connection whose
/// transaction did not end cleanly (a failed statement or commit, a full disk, a cancelled
/// future) is closed instead of going back to the pool: the next write gets a fresh one, so a
/// fault never outlives its cause.
///
/// Architecture invariant: the write turn is released only once its connection holds no
/// transaction (committed, rolled back, or closed). A transaction dropped before it ended (a
/// gRPC handler cancelled when its client went away) hands both to a task that rolls back and
/// closes the connection and only then lets the next writer begin: its statements, even its
/// `BEGIN IMMEDIATE`, may still be running on the connection's worker thread.
struct WriteTx {
    /// The connection and the turn, together until the transaction ends (`None` only once
    /// `Drop` took them).
    held: Option<Held>,
    ended: bool,
    failure: Arc<std::sync::Mutex<Option<String>>>,
    /// When its `BEGIN IMMEDIATE` was sent (`pipeline_db_write_seconds` runs from here to
    /// the `COMMIT`'s answer).
    began: std::time::Instant,
    /// Publishes the feed after the commit; `None` for a write that records no entry (log
    /// lines: anything one did record would go out with the next write).
    publisher: Option<Publisher>,
}

/// A write transaction's connection and the write turn it holds.
struct Held {
    conn: sqlx::pool::PoolConnection<Sqlite>,
    turn: tokio::sync::OwnedMutexGuard<()>,
}

impl Held {
    /// Ends whatever transaction the connection holds and closes it, then releases the turn.
    /// The `ROLLBACK` queues on the connection's worker behind whatever a cancelled future left
    /// running there (a statement, a `BEGIN IMMEDIATE` that may yet succeed), so once it
    /// answers, the connection holds no lock.
    async fn end(self) {
        let Held { mut conn, turn } = self;
        // Should this task be dropped first (the runtime stopping), the connection is closed,
        // not handed back.
        conn.close_on_drop();
        // An error is expected when no transaction was open (a `BEGIN` that failed).
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        if let Err(e) = conn.close().await {
            tracing::warn!(error = %e, "closing a failed write's database connection");
        }
        drop(turn);
    }
}

impl WriteTx {
    async fn commit(mut self) -> Result<()> {
        match sqlx::query("COMMIT").execute(&mut *self).await {
            Ok(_) => {
                self.ended = true;
                self.set_failure(None);
                crate::metrics::metrics()
                    .db_write
                    .observe(self.began.elapsed().as_secs_f64());
                // Still holding the write turn: the next writer's entries come after these.
                if let Some(publisher) = self.publisher.clone() {
                    publisher.publish(&mut self).await;
                }
                Ok(())
            }
            Err(e) => {
                // Dropped unended: its connection is rolled back and closed before the turn
                // goes to the next writer.
                self.set_failure(Some(format!("committing a write failed: {e}")));
                Err(e.into())
            }
        }
    }

    /// Ends the transaction without writing anything (a refused request).
    async fn rollback(mut self) {
        if sqlx::query("ROLLBACK").execute(&mut *self).await.is_ok() {
            self.ended = true;
        }
    }

    /// Commits when `result` is a success, rolls back when it is a refusal (the connection
    /// stays usable), and otherwise drops the transaction (closing its connection).
    async fn finish<T>(self, result: Result<T>) -> Result<T> {
        match result {
            Ok(value) => self.commit().await.map(|()| value),
            Err(
                refusal @ (Error::Conflict(_)
                | Error::NotFound(_)
                | Error::AlreadyExists(_)
                | Error::FailedPrecondition(_)
                | Error::InvalidArgument(_)),
            ) => {
                self.rollback().await;
                Err(refusal)
            }
            Err(other) => Err(other),
        }
    }

    fn set_failure(&self, failure: Option<String>) {
        if let Ok(mut f) = self.failure.lock() {
            *f = failure;
        }
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // Every write that did not end cleanly ends here (a failed begin, statement or commit,
        // a cancelled future): `pipeline_db_errors_total` counts them.
        crate::metrics::metrics().db_errors.inc();
        if let Ok(mut f) = self.failure.lock()
            && f.is_none()
        {
            *f = Some("a write transaction failed (see the server log)".to_owned());
        }
        let Some(held) = self.held.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(held.end());
            }
            // No runtime to end it on (the server is gone): closing the connection rolls back
            // whatever it held.
            Err(_) => {
                let Held { mut conn, turn } = held;
                conn.close_on_drop();
                drop(conn);
                drop(turn);
            }
        }
    }
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.held.as_ref().expect("held until dropped").conn
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.held.as_mut().expect("held until dropped").conn
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://PATH` or a plain path) and
    /// brings its schema up to date.
    pub async fn open(url: &str) -> Result<Self> {
        let url = if url.starts_with("sqlite:") {
            url.to_owned()
        } else {
            format!("sqlite://{url}")
        };
        let options = SqliteConnectOptions::from_str(&url)
            .map_err(|e| Error::InvalidArgument(format!("invalid database url {url}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| Error::Internal(format!("cannot open the database {url}: {e}")))?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        let newest: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM task_events")
            .fetch_one(&pool)
            .await?;
        Ok(Self {
            pool,
            writer: Arc::new(tokio::sync::Mutex::new(())),
            write_failure: Arc::default(),
            feed: Publisher {
                feed: Feed::new(),
                published: Arc::new(std::sync::atomic::AtomicI64::new(newest)),
            },
        })
    }

    /// Closes every connection, checkpointing the WAL.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Begins a write transaction: a connection first, then the write turn, so the turn is
    /// held only while the transaction runs. The transaction counts as begun (and is ended by
    /// `Drop` when this future is dropped) from the moment its `BEGIN IMMEDIATE` is sent: a
    /// future dropped while that runs must not hand back a connection the `BEGIN` then took
    /// the write lock on.
    async fn write(&self) -> Result<WriteTx> {
        let conn = self.pool.acquire().await?;
        let turn = Arc::clone(&self.writer).lock_owned().await;
        let mut tx = WriteTx {
            held: Some(Held { conn, turn }),
            ended: false,
            failure: Arc::clone(&self.write_failure),
            began: std::time::Instant::now(),
            publisher: Some(self.feed.clone()),
        };
        if let Err(e) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *tx).await {
            tx.set_failure(Some(format!("beginning a write failed: {e}")));
            return Err(e.into());
        }
        Ok(tx)
    }
}

super::sql::impl_store_by_concern!(SqliteStore);

#[cfg(test)]
mod tests {
    use super::SqliteStore;
    use crate::store::suite;
    use std::sync::Arc;

    async fn fresh() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pipeline.db");
        let store = SqliteStore::open(path.to_str().expect("utf-8 path"))
            .await
            .expect("open store");
        (dir, store)
    }

    crate::store_test_suite!(fresh);

    #[test]
    fn a_list_reads_as_much_feedback_as_a_row_shows() {
        let tail = format!(
            "substr(CAST(feedback AS BLOB), -{})",
            pipeline_core::lines::LIST_FEEDBACK_BYTES
        );
        assert!(
            super::rows::LIST_COLUMNS.contains(&tail),
            "{}",
            super::rows::LIST_COLUMNS
        );
    }

    /// A write whose future is dropped while its `BEGIN IMMEDIATE` runs (a gRPC handler whose
    /// client went away: a runner SIGKILLed while it opened its work stream) leaves no
    /// transaction open behind it: the next write begins at once, and the dropped one wrote
    /// nothing. (Its connection went back to the pool holding the write lock, and every
    /// later write failed after the busy timeout with "database is locked".)
    #[tokio::test]
    async fn a_write_dropped_while_it_begins_leaves_no_transaction_behind() {
        use crate::store::Store;
        use sqlx::Connection;
        use std::future::Future;
        use std::task::Poll;

        let (dir, store) = fresh().await;
        // Another connection holds the write lock, so the store's BEGIN IMMEDIATE waits on its
        // connection's worker thread (in SQLite's busy handler) until that one lets go.
        let path = dir.path().join("pipeline.db");
        let mut holder = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("connect");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut holder)
            .await
            .expect("hold the write lock");
        let mut dropped = Box::pin(store.put_meta("dropped", "1"));
        // Polled until it holds the write turn: it then waits for its BEGIN IMMEDIATE.
        while store.writer.try_lock().is_ok() {
            let pending =
                std::future::poll_fn(|cx| Poll::Ready(dropped.as_mut().poll(cx).is_pending()))
                    .await;
            assert!(pending, "the write cannot end while the lock is held");
            tokio::task::yield_now().await;
        }
        drop(dropped);
        sqlx::query("ROLLBACK")
            .execute(&mut holder)
            .await
            .expect("let go");
        holder.close().await.expect("close");
        // Whatever became of the dropped write's connection happened: it is back in the pool
        // or closed, and the write turn is free.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while store.pool.num_idle() != store.pool.size() as usize
            || store.writer.try_lock().is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the dropped write's connection never came back"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // A reader has the pool's idle connection, so the next write gets another one: it
        // waits for the write lock, not for the dropped write's connection to be handed out.
        let _reader = store.pool.acquire().await.expect("acquire");

        store
            .put_meta("after", "1")
            .await
            .expect("the next write begins");
        assert_eq!(
            store.get_meta("after").await.expect("read").as_deref(),
            Some("1")
        );
        assert_eq!(store.get_meta("dropped").await.expect("read"), None);
        assert_eq!(store.write_failure(), None, "a later write succeeded");
    }

    /// A write transaction dropped before it ended (its handler cancelled mid-statement)
    /// keeps the write turn until its connection let go of SQLite's lock: when the next
    /// writer gets the turn, the lock is free at once (no wait in the busy handler, which a
    /// close that outlasts it would turn into "database is locked").
    #[tokio::test]
    async fn a_write_dropped_mid_transaction_keeps_the_turn_until_its_lock_is_gone() {
        use crate::store::Store;
        use sqlx::Connection;

        let (dir, store) = fresh().await;
        let path = dir.path().join("pipeline.db");
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(std::time::Duration::ZERO);
        let mut other = sqlx::SqliteConnection::connect_with(&options)
            .await
            .expect("connect");
        let mut tx = store.write().await.expect("begin");
        sqlx::query("INSERT INTO meta (key, value) VALUES ('dropped', '1')")
            .execute(&mut *tx)
            .await
            .expect("insert");
        drop(tx);
        assert!(
            store.writer.try_lock().is_err(),
            "the turn stays with the dropped transaction until its connection let go"
        );
        let turn = Arc::clone(&store.writer).lock_owned().await;
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .expect("the write lock is free");
        sqlx::query("ROLLBACK")
            .execute(&mut other)
            .await
            .expect("rollback");
        drop(turn);
        assert_eq!(store.get_meta("dropped").await.expect("read"), None);
        assert!(store.write_failure().is_some(), "a failed write is told");
        store.put_meta("after", "1").await.expect("write");
        assert_eq!(store.write_failure(), None);
    }

    #[tokio::test]
    async fn state_survives_reopening_the_file() {
        let (dir, store) = fresh().await;
        let created = suite::create(&store, "survivor").await;
        store.close().await;
        let path = dir.path().join("pipeline.db");
        let reopened = SqliteStore::open(path.to_str().expect("utf-8 path"))
            .await
            .expect("reopen");
        use crate::store::Store;
        let again = reopened.get_task(&created.id).await.expect("read");
        assert_eq!(again, Some(created));
    }
}
