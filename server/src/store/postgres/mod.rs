//! The PostgreSQL [`Store`] (`--db postgres://…`): a pool of connections, migrations from
//! `migrations/postgres` run at open (sqlx takes an advisory lock, so servers starting at once
//! on one database migrate it once), and one short transaction per state change, begun by
//! [`PgStore::begin_write`] and nowhere else.
//!
//! The write turn is the row lock of the feed's one-row counter (`feed_head`): every write that
//! may record a feed entry takes it first (`SELECT … FOR UPDATE`), so writers of this process
//! and of any other on the same database take turns there, as SQLite's take turns at
//! `SqliteStore`'s queue. Holding it to `COMMIT` orders the feed's positions (each from
//! `UPDATE feed_head SET pos = pos + n RETURNING pos`, `events.rs`) in commit order, keeps the
//! plan's reads (generated IDs, cycle checks) true until the write commits, and, taken first
//! by all, can make no deadlock. Log lines, which record no entry, do not take it.
//!
//! Readers never wait for writers (MVCC). A compare-and-swap on a task's `version` is the
//! `UPDATE … WHERE id = $ AND version = $` of `commit.rs`; an epic's figures are kept by
//! PostgreSQL triggers (`child_created`, `child_changed` in `0001_schema.sql`), the same rule as
//! SQLite's triggers and `plan::child_moved`.
//!
//! The feed is published after each `COMMIT`, in position order: the entries after the newest
//! one published are read and sent under an in-process lock ([`Publisher`]). A position is
//! visible only once every position before it is (the counter's lock), so such a read never
//! skips one.
//!
//! Modules by concern as in `sqlite/`: `tasks`, `commit`, `runs`, `events`, `trains`, `logs`,
//! `meta`, `sessions`, `webhooks`; below them `reads` (the plan's reads in SQL), `graph`, `rows`
//! and `errors` (PostgreSQL's errors as the domain's).

mod commit;
pub(crate) mod errors;
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

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{PgConnection, Postgres};

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

/// Connections of one server's pool: writers wait at the counter's lock holding one each, and
/// readers take the rest.
const POOL_SIZE: u32 = 10;

/// How long a session may sit in a transaction between statements before PostgreSQL ends it.
const IDLE_IN_TRANSACTION: &str = "30s";

/// Why a write is refused on a server that does not lead (or no longer does).
const NOT_LEADING: &str = "this server does not lead the database now (a standby); try the leader";

/// A task store in a PostgreSQL database.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Why the last write failed, until one succeeds again (for the server's health).
    write_failure: Arc<std::sync::Mutex<Option<String>>>,
    /// The change feed's broadcast and the newest position published on it.
    feed: Publisher,
    /// This server's leadership among the servers on the database (issue 28), once the server
    /// set it: every write checks it and runs the fence with its term. Unset (the store suite,
    /// tools), writes are not fenced.
    leadership: Arc<std::sync::OnceLock<crate::leader::Leadership>>,
}

/// What publishes the feed's entries: after a write commits, the entries after the newest one
/// published are read and sent in position order, one publisher at a time. Entries a failed
/// read left unpublished go out with the next write (followers catch up from storage when
/// behind or when they see a gap).
#[derive(Clone)]
struct Publisher {
    feed: Feed,
    published: Arc<tokio::sync::Mutex<i64>>,
}

impl Publisher {
    /// Publishes what the last transaction (and any before it, of this process or another)
    /// recorded.
    async fn publish(&self, pool: &PgPool) {
        let mut published = self.published.lock().await;
        let rows = match events::unpublished(pool, *published).await {
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
            *published = position;
        }
    }
}

/// Which writes take the write turn (the counter's row lock) as they begin.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// Every write that may record a feed entry or reads what it then writes.
    Take,
    /// Log lines: they record no entry and decide nothing on what they read.
    Skip,
}

/// A write transaction on a connection of the pool, begun by one simple query that also runs
/// the fence and takes the write turn ([`PgStore::begin_write`]) and ended by `COMMIT` or
/// `ROLLBACK`. A dropped one that did not end (a failed statement or commit, a cancelled
/// future) closes its connection instead of returning it to the pool: PostgreSQL rolls the
/// transaction back as the session ends, which also lets go of the write turn. (sqlx's own
/// `Transaction` would queue a `ROLLBACK` instead, but it begins with a `BEGIN` round trip of
/// its own: one write paid three round trips before its first statement, now one.)
struct WriteTx {
    conn: Option<sqlx::pool::PoolConnection<Postgres>>,
    ended: bool,
    failure: Arc<std::sync::Mutex<Option<String>>>,
    began: std::time::Instant,
    /// Publishes the feed after the commit; `None` for a write that records no entry.
    publisher: Option<(Publisher, PgPool)>,
}

impl WriteTx {
    async fn commit(mut self) -> Result<()> {
        let conn = self.conn.as_mut().expect("held until it ends");
        match sqlx::Executor::execute(&mut **conn, "COMMIT").await {
            Ok(_) => {
                self.ended = true;
                self.set_failure(None);
                crate::metrics::metrics()
                    .db_write
                    .observe(self.began.elapsed().as_secs_f64());
                // The connection goes back to the pool before the feed is published.
                drop(self.conn.take());
                if let Some((publisher, pool)) = self.publisher.take() {
                    publisher.publish(&pool).await;
                }
                Ok(())
            }
            Err(e) => {
                self.set_failure(Some(format!("committing a write failed: {e}")));
                Err(e.into())
            }
        }
    }

    /// Ends the transaction without writing anything (a refused request).
    async fn rollback(mut self) {
        if let Some(conn) = self.conn.as_mut()
            && sqlx::Executor::execute(&mut **conn, "ROLLBACK")
                .await
                .is_ok()
        {
            self.ended = true;
        }
    }

    /// Commits when `result` is a success, rolls back when it is a refusal, and otherwise
    /// drops the transaction (its connection closed, which rolls it back).
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
        // The session ends with the connection, and PostgreSQL rolls its transaction back.
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
        // Every write that did not end cleanly ends here: `pipeline_db_errors_total` counts
        // them.
        crate::metrics::metrics().db_errors.inc();
        if let Ok(mut f) = self.failure.lock()
            && f.is_none()
        {
            *f = Some("a write transaction failed (see the server log)".to_owned());
        }
    }
}

impl std::ops::Deref for WriteTx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("held until it ends")
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("held until it ends")
    }
}

/// `url` with its password, if any, left out: what a message may show.
pub(crate) fn shown_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url.to_owned(),
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://…` or `postgresql://…`) and brings its
    /// schema up to date.
    pub async fn open(url: &str) -> Result<Self> {
        let shown = shown_url(url);
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "--db {shown}: not a PostgreSQL URL ({e}); give \
                     postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
                ))
            })?
            // A transaction left open by a process that froze (SIGSTOP) or lost its way holds
            // the write turn; the server ends its session after this long, so writers of other
            // processes go on. Ours are milliseconds between statements.
            .options([
                ("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION),
                // No JIT compilation: every statement here reads or writes a few rows, and
                // a prepared statement's generic plan with a `LIMIT $n` is costed past
                // `jit_above_cost`, so a page of 100 tasks took 70 ms of compiling to run
                // in 0.4 ms.
                ("jit", "off"),
            ]);
        // One connection first: its failure says why (the pool would retry an unreachable
        // server until its timeout and then say only that).
        let first = <PgConnection as sqlx::Connection>::connect_with(&options)
            .await
            .map_err(|e| errors::cannot_open(&shown, &e))?;
        let _ = sqlx::Connection::close(first).await;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| errors::cannot_open(&shown, &e))?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let newest: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM task_events")
            .fetch_one(&pool)
            .await?;
        Ok(Self {
            pool,
            write_failure: Arc::default(),
            leadership: Arc::default(),
            feed: Publisher {
                feed: Feed::new(),
                published: Arc::new(tokio::sync::Mutex::new(newest)),
            },
        })
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The pool, for the leader's elector (its lease is a row of this database).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Publishes on the feed's broadcast what other servers recorded since the last entry
    /// published here: a standby (issue 28), which writes nothing itself, follows the leader's
    /// feed with this.
    pub async fn follow_feed(&self) {
        self.feed.publish(&self.pool).await;
    }

    /// Fences every write from now on by `leadership` (once; later calls change nothing).
    pub fn set_leadership(&self, leadership: crate::leader::Leadership) {
        let _ = self.leadership.set(leadership);
    }

    /// Begins a write transaction: `write` (the write turn taken) or `write_logs`.
    async fn write(&self) -> Result<WriteTx> {
        self.begin_write(Turn::Take).await
    }

    /// Begins a write transaction that records no feed entry (log lines).
    async fn write_logs(&self) -> Result<WriteTx> {
        self.begin_write(Turn::Skip).await
    }

    /// The one place a write transaction begins. With a leadership set (issue 28): only in a
    /// term this server leads in before its local deadline, and the transaction's first
    /// statement is the fence with that term, so the database refuses (`PLF01`) a term that
    /// no longer holds a live lease and orders the write before any takeover. A refusal is
    /// [`Error::Busy`] (`UNAVAILABLE`: the infrastructure's, never a task's), and a fenced
    /// term is lost at once ([`crate::leader::Leadership::lost`]).
    async fn begin_write(&self, turn: Turn) -> Result<WriteTx> {
        let term = match self.leadership.get() {
            None => None,
            Some(leadership) => match leadership.writing_term() {
                Some(term) => Some((leadership, term)),
                None => return Err(Error::Busy(NOT_LEADING.to_owned())),
            },
        };
        let failure = Arc::clone(&self.write_failure);
        let began = std::time::Instant::now();
        let conn = match self.pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                if let Ok(mut f) = failure.lock() {
                    *f = Some(format!("beginning a write failed: {e}"));
                }
                return Err(e.into());
            }
        };
        let mut tx = WriteTx {
            conn: Some(conn),
            ended: false,
            failure,
            began,
            publisher: (turn == Turn::Take).then(|| (self.feed.clone(), self.pool.clone())),
        };
        // One simple query, one round trip: the term is a number written into it.
        let mut begin = String::from("BEGIN");
        if let Some((_, term)) = term {
            begin.push_str(&format!(
                "; {}",
                crate::leader::FENCE_SQL.replace("$1", &term.to_string())
            ));
        }
        if turn == Turn::Take {
            begin.push_str("; SELECT pos FROM feed_head FOR UPDATE");
        }
        if let Err(e) = sqlx::Executor::execute(&mut *tx, begin.as_str()).await {
            if let Some((leadership, term)) = term
                && e.as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| c == crate::leader::FENCED_SQLSTATE)
            {
                // Refused, not failed: nothing was written and the database is fine.
                tx.rollback().await;
                leadership.lost(term);
                return Err(Error::Busy(NOT_LEADING.to_owned()));
            }
            tx.set_failure(Some(format!("beginning a write failed: {e}")));
            return Err(e.into());
        }
        Ok(tx)
    }
}

super::sql::impl_store_by_concern!(PgStore);

#[cfg(test)]
mod tests {
    use super::PgStore;
    use pipeline_core::pgtest::{PgDatabase, PgServer};

    /// A store on a fresh database of the test process's PostgreSQL.
    async fn fresh() -> (PgDatabase<'static>, PgStore) {
        let db = PgServer::shared().database();
        let store = PgStore::open(db.url()).await.expect("open store");
        (db, store)
    }

    crate::store_test_suite!(fresh);

    /// A write dropped mid-transaction (its handler cancelled) wrote nothing and does not keep
    /// the write turn (the counter's row lock): the next write, from this store or another
    /// on the same database, goes through.
    #[tokio::test]
    async fn a_dropped_write_leaves_nothing_and_lets_the_next_writer_go() {
        use crate::store::Store;
        let (db, store) = fresh().await;
        let mut tx = store.write().await.expect("begin");
        sqlx::query("INSERT INTO meta (key, value) VALUES ('dropped', '1')")
            .execute(&mut *tx)
            .await
            .expect("insert");
        drop(tx);
        let other = PgStore::open(db.url()).await.expect("second store");
        other.put_meta("after", "1").await.expect("the next write");
        store
            .put_meta("again", "1")
            .await
            .expect("and this store's");
        assert_eq!(store.get_meta("dropped").await.expect("read"), None);
        assert_eq!(
            other.get_meta("after").await.expect("read").as_deref(),
            Some("1")
        );
        assert_eq!(store.write_failure(), None, "a later write succeeded");
    }

    /// Two stores on one database (two servers' processes) writing at once: the positions
    /// they give are distinct, none is skipped, and each store publishes every entry (its own
    /// and the other's) in position order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writers_of_two_stores_on_one_database_take_turns_at_the_counter() {
        use crate::store::Store;
        let (db, one) = fresh().await;
        let two = PgStore::open(db.url()).await.expect("second store");
        let mut rx_one = one.feed().subscribe();
        let mut writers = tokio::task::JoinSet::new();
        for (w, store) in [one.clone(), two.clone(), one.clone(), two.clone()]
            .into_iter()
            .enumerate()
        {
            writers.spawn(async move {
                for i in 0..15 {
                    store
                        .record(&crate::feed::NewEntry {
                            topic: crate::feed::Topic::Runner,
                            subject: format!("r{w}"),
                            kind: "connected".into(),
                            at: i,
                            message: format!("{w}/{i}"),
                            data: "{}".into(),
                        })
                        .await
                        .expect("record");
                }
            });
        }
        while let Some(done) = writers.join_next().await {
            done.expect("writer");
        }
        let stored = one.entries_after(0, 1_000).await.expect("entries");
        let positions: Vec<i64> = stored.iter().map(|e| e.position).collect();
        assert_eq!(positions, (1..=60).collect::<Vec<i64>>(), "none skipped");
        let mut sent = Vec::new();
        while let Ok(entry) = rx_one.try_recv() {
            sent.push(entry.position);
        }
        // Store one published after each of its own commits: at least up to its last one, in
        // order, none twice.
        assert!(sent.windows(2).all(|w| w[1] == w[0] + 1), "{sent:?}");
        assert_eq!(sent.first(), Some(&1));
    }

    /// With a leadership set (issue 28): a standby's write is refused before anything is
    /// written; the leader's goes through; once another server took the lease, the fence in
    /// the write's own transaction refuses it (`UNAVAILABLE`, no failure of the database), and
    /// this server is at once a standby that writes nothing more.
    #[tokio::test]
    async fn writes_are_fenced_by_the_leaders_term() {
        use crate::error::Error;
        use crate::leader::{Elector, Role, Settings};
        use crate::store::Store;
        use std::time::Duration;
        let (_db, store) = fresh().await;
        let (elector, leadership) = Elector::new(
            store.pool().clone(),
            Settings {
                ttl: Duration::from_secs(60),
                advertise: "http://a:50051".to_owned(),
            },
        );
        store.set_leadership(leadership.clone());
        let refused = store.put_meta("standby", "1").await;
        assert!(matches!(refused, Err(Error::Busy(_))), "{refused:?}");
        elector.step().await;
        assert_eq!(leadership.role(), Role::Leader { term: 1 });
        store
            .put_meta("leader", "1")
            .await
            .expect("the leader writes");
        // Another server takes the lease (as if this one's had expired).
        sqlx::query(
            "UPDATE leader_lease SET term = term + 1, holder = 'b', advertise = 'http://b:50051',
             expires_at = now() + interval '1 hour' WHERE id = 1",
        )
        .execute(store.pool())
        .await
        .expect("take over");
        let fenced = store.put_meta("fenced", "1").await;
        assert!(matches!(fenced, Err(Error::Busy(_))), "{fenced:?}");
        assert!(matches!(leadership.role(), Role::Standby { .. }));
        assert_eq!(leadership.writing_term(), None);
        assert_eq!(store.write_failure(), None, "a refusal, not a failure");
        assert_eq!(store.get_meta("fenced").await.expect("read"), None);
        assert_eq!(store.get_meta("standby").await.expect("read"), None);
        // The elector then learns who leads.
        elector.step().await;
        assert_eq!(
            leadership.role(),
            Role::Standby {
                leader_url: Some("http://b:50051".to_owned())
            }
        );
    }

    /// A page of a list reads about the page, not the table: under the generic plan
    /// PostgreSQL gives a prepared statement after a few runs, the first page of every task
    /// and a page deep in the list (after the key of the last priority) each start at their key
    /// in an index. (The two ranges of the key's priority and of the priorities after it were
    /// planned as a scan of the primary key filtered by priority, which read every task for
    /// the first page.)
    #[tokio::test]
    async fn a_list_page_reads_from_its_key_under_the_generic_plan() {
        use sqlx::Executor;
        let (_db, store) = fresh().await;
        let mut conn = store.pool().acquire().await.expect("connection");
        conn.execute(
            "INSERT INTO tasks (id, title, priority, status, created_at, updated_at) \
             SELECT 't-' || g, 'task ' || g, g % 5, 'open', 1, 1 \
             FROM generate_series(1, 20000) AS g; ANALYZE tasks; \
             SET plan_cache_mode = force_generic_plan",
        )
        .await
        .expect("tasks");
        let columns = format!(
            "{}, {}",
            super::rows::LIST_COLUMNS,
            super::rows::DEPS_COLUMN
        );
        let page = super::rows::keyset_page(&columns, "TRUE");
        conn.execute(format!("PREPARE page (bigint, bigint, bigint) AS {page}").as_str())
            .await
            .expect("prepare");
        for key in ["-1, -1", "4, 19000"] {
            let plan: Vec<String> = sqlx::query_scalar(&format!(
                "EXPLAIN (ANALYZE, TIMING OFF, COSTS OFF) EXECUTE page ({key}, 100)"
            ))
            .fetch_all(&mut *conn)
            .await
            .expect("explain");
            let removed: u64 = plan
                .iter()
                .filter_map(|l| l.trim().strip_prefix("Rows Removed by Filter: "))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum();
            assert!(removed < 1000, "after ({key}): {}", plan.join("\n"));
            assert!(
                plan.iter().any(|l| l.contains("actual rows=100 ")),
                "a full page after ({key}): {}",
                plan.join("\n")
            );
        }
    }

    /// A database that cannot be reached is refused at open in one line saying what to check.
    #[tokio::test]
    async fn an_unreachable_database_is_refused_in_one_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!(
            "postgres://ann:secret@localhost/pipeline?host={}",
            dir.path().display()
        );
        let err = PgStore::open(&url)
            .await
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("is PostgreSQL running"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn a_list_reads_as_much_feedback_as_a_row_shows() {
        let tail = format!(
            "octet_length(feedback) - {}",
            pipeline_core::lines::LIST_FEEDBACK_BYTES - 1
        );
        assert!(
            super::rows::LIST_COLUMNS.contains(&tail),
            "{}",
            super::rows::LIST_COLUMNS
        );
    }
}
