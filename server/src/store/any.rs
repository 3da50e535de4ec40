//! The store `--db` names: the one place a database URL is read ([`Database::parse`]) and a
//! backend chosen ([`Database::open`], yielding an [`AnyStore`]). SQLite takes `sqlite://PATH`,
//! `sqlite:PATH` or a plain path; PostgreSQL `postgres://…` or `postgresql://…`.

use std::path::{Path, PathBuf};

use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use super::{
    Committed, EndSessions, Journal, NewEvent, NewRun, RunEnd, SessionRecord, Store, TaskFilter,
    TaskWrite, TrainEnd, TrainStat, UsageBucket, WebhookCursor,
};
use crate::domain::{
    LogLine, Millis, NewTask, Phase, Run, StatusCounts, Task, TaskEdit, TaskEvent, TaskId,
    TaskStatus,
};
use crate::error::{Error, Result};
use pipeline_core::ids::CommitId;

/// A database, as `--db` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Database {
    /// An SQLite file: the URL as given, and the file's path when it is a file (not
    /// `:memory:`).
    Sqlite { url: String, file: Option<PathBuf> },
    /// A PostgreSQL database: the URL as given (`postgres://…` or `postgresql://…`).
    Postgres { url: String },
}

impl Database {
    /// Reads `--db`: `sqlite://PATH`, `sqlite:PATH` (either with `?options`) or a plain path is
    /// SQLite; `postgres://…` and `postgresql://…` are PostgreSQL (the URL is checked here,
    /// the server reached at [`Database::open`]); any other `scheme://` is refused saying
    /// what is taken.
    pub fn parse(url: &str) -> Result<Self> {
        if let Some((scheme, _)) = url.split_once("://")
            && scheme != "sqlite"
            && !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        {
            if matches!(scheme, "postgres" | "postgresql") {
                return match url.parse::<sqlx::postgres::PgConnectOptions>() {
                    Ok(_) => Ok(Database::Postgres {
                        url: url.to_owned(),
                    }),
                    Err(e) => Err(Error::InvalidArgument(format!(
                        "--db {}: not a valid PostgreSQL URL ({e}); give \
                         postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
                        super::postgres::shown_url(url)
                    ))),
                };
            }
            return Err(Error::InvalidArgument(format!(
                "--db {scheme}://…: unknown kind of database; give an SQLite file \
                 (sqlite://PATH or a path) or a PostgreSQL URL (postgres://…)"
            )));
        }
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        let path = rest.split('?').next().unwrap_or_default();
        let file = (!path.is_empty() && !path.starts_with(':')).then(|| PathBuf::from(path));
        Ok(Database::Sqlite {
            url: url.to_owned(),
            file,
        })
    }

    /// The file the database is in, when it is one: what builds may not reach, and what the
    /// database's lock sits beside.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Database::Sqlite { file, .. } => file.as_deref(),
            Database::Postgres { .. } => None,
        }
    }

    /// Opens the database (creating it if missing) and brings its schema up to date.
    pub async fn open(&self) -> Result<AnyStore> {
        match self {
            Database::Sqlite { url, .. } => Ok(AnyStore::Sqlite(SqliteStore::open(url).await?)),
            Database::Postgres { url } => Ok(AnyStore::Postgres(PgStore::open(url).await?)),
        }
    }
}

/// The store the server runs on, whichever backend `--db` chose.
#[derive(Clone)]
pub enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl AnyStore {
    /// Closes every connection (SQLite: checkpointing its WAL).
    pub async fn close(&self) {
        match self {
            AnyStore::Sqlite(s) => s.close().await,
            AnyStore::Postgres(s) => s.close().await,
        }
    }
}

impl Store for AnyStore {
    async fn create_task(&self, new: NewTask, now: Millis) -> Result<Task> {
        match self {
            AnyStore::Sqlite(s) => s.create_task(new, now).await,
            AnyStore::Postgres(s) => s.create_task(new, now).await,
        }
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<Task>> {
        match self {
            AnyStore::Sqlite(s) => s.get_task(id).await,
            AnyStore::Postgres(s) => s.get_task(id).await,
        }
    }

    async fn create_tasks(&self, new: Vec<NewTask>, now: Millis) -> Result<Vec<(Task, TaskEvent)>> {
        match self {
            AnyStore::Sqlite(s) => s.create_tasks(new, now).await,
            AnyStore::Postgres(s) => s.create_tasks(new, now).await,
        }
    }

    async fn list_tasks(
        &self,
        filter: &TaskFilter,
        after: Option<(u8, i64)>,
        limit: u32,
    ) -> Result<Vec<Task>> {
        match self {
            AnyStore::Sqlite(s) => s.list_tasks(filter, after, limit).await,
            AnyStore::Postgres(s) => s.list_tasks(filter, after, limit).await,
        }
    }

    async fn set_paused(
        &self,
        id: &TaskId,
        paused: Option<&str>,
        message: &str,
        now: Millis,
    ) -> Result<u32> {
        match self {
            AnyStore::Sqlite(s) => s.set_paused(id, paused, message, now).await,
            AnyStore::Postgres(s) => s.set_paused(id, paused, message, now).await,
        }
    }

    async fn edit_task(
        &self,
        id: &TaskId,
        version: i64,
        edit: &TaskEdit,
        event: NewEvent,
        now: Millis,
    ) -> Result<Task> {
        match self {
            AnyStore::Sqlite(s) => s.edit_task(id, version, edit, event, now).await,
            AnyStore::Postgres(s) => s.edit_task(id, version, edit, event, now).await,
        }
    }

    async fn add_dependencies(
        &self,
        id: &TaskId,
        deps: &[TaskId],
        event: NewEvent,
        now: Millis,
    ) -> Result<Task> {
        match self {
            AnyStore::Sqlite(s) => s.add_dependencies(id, deps, event, now).await,
            AnyStore::Postgres(s) => s.add_dependencies(id, deps, event, now).await,
        }
    }

    async fn commit(&self, write: TaskWrite) -> Result<Committed> {
        match self {
            AnyStore::Sqlite(s) => s.commit(write).await,
            AnyStore::Postgres(s) => s.commit(write).await,
        }
    }

    async fn commit_all(&self, writes: Vec<TaskWrite>) -> Result<Vec<Result<Committed>>> {
        match self {
            AnyStore::Sqlite(s) => s.commit_all(writes).await,
            AnyStore::Postgres(s) => s.commit_all(writes).await,
        }
    }

    async fn runs(&self, id: &TaskId) -> Result<Vec<Run>> {
        match self {
            AnyStore::Sqlite(s) => s.runs(id).await,
            AnyStore::Postgres(s) => s.runs(id).await,
        }
    }

    async fn events(&self, id: &TaskId) -> Result<Vec<TaskEvent>> {
        match self {
            AnyStore::Sqlite(s) => s.events(id).await,
            AnyStore::Postgres(s) => s.events(id).await,
        }
    }

    async fn status_counts(&self) -> Result<StatusCounts> {
        match self {
            AnyStore::Sqlite(s) => s.status_counts().await,
            AnyStore::Postgres(s) => s.status_counts().await,
        }
    }

    async fn lease_candidates(
        &self,
        now: Millis,
        after: Option<(u8, i64)>,
        limit: u32,
    ) -> Result<Vec<Task>> {
        match self {
            AnyStore::Sqlite(s) => s.lease_candidates(now, after, limit).await,
            AnyStore::Postgres(s) => s.lease_candidates(now, after, limit).await,
        }
    }

    async fn verified(&self) -> Result<Vec<Task>> {
        match self {
            AnyStore::Sqlite(s) => s.verified().await,
            AnyStore::Postgres(s) => s.verified().await,
        }
    }

    async fn unfinished(&self) -> Result<Vec<Task>> {
        match self {
            AnyStore::Sqlite(s) => s.unfinished().await,
            AnyStore::Postgres(s) => s.unfinished().await,
        }
    }

    async fn finished_epics(&self) -> Result<Vec<TaskId>> {
        match self {
            AnyStore::Sqlite(s) => s.finished_epics().await,
            AnyStore::Postgres(s) => s.finished_epics().await,
        }
    }

    async fn tokens_of(&self, ids: &[TaskId]) -> Result<Vec<(TaskId, u64)>> {
        match self {
            AnyStore::Sqlite(s) => s.tokens_of(ids).await,
            AnyStore::Postgres(s) => s.tokens_of(ids).await,
        }
    }

    async fn statuses(&self, ids: &[TaskId]) -> Result<Vec<(TaskId, TaskStatus)>> {
        match self {
            AnyStore::Sqlite(s) => s.statuses(ids).await,
            AnyStore::Postgres(s) => s.statuses(ids).await,
        }
    }

    async fn raise_next_task_number(&self, at_least: u64) -> Result<()> {
        match self {
            AnyStore::Sqlite(s) => s.raise_next_task_number(at_least).await,
            AnyStore::Postgres(s) => s.raise_next_task_number(at_least).await,
        }
    }

    async fn is_fresh(&self) -> Result<bool> {
        match self {
            AnyStore::Sqlite(s) => s.is_fresh().await,
            AnyStore::Postgres(s) => s.is_fresh().await,
        }
    }

    async fn next_backoff_end(&self, now: Millis) -> Result<Option<Millis>> {
        match self {
            AnyStore::Sqlite(s) => s.next_backoff_end(now).await,
            AnyStore::Postgres(s) => s.next_backoff_end(now).await,
        }
    }

    async fn begin_integration(&self, entries: &[(Journal, CommitId)]) -> Result<Option<TaskId>> {
        match self {
            AnyStore::Sqlite(s) => s.begin_integration(entries).await,
            AnyStore::Postgres(s) => s.begin_integration(entries).await,
        }
    }

    async fn start_train(&self, base_tip: &CommitId, tasks: &[TaskId], at: Millis) -> Result<i64> {
        match self {
            AnyStore::Sqlite(s) => s.start_train(base_tip, tasks, at).await,
            AnyStore::Postgres(s) => s.start_train(base_tip, tasks, at).await,
        }
    }

    async fn trains_in_flight(&self) -> Result<Vec<(i64, Vec<TaskId>)>> {
        match self {
            AnyStore::Sqlite(s) => s.trains_in_flight().await,
            AnyStore::Postgres(s) => s.trains_in_flight().await,
        }
    }

    async fn end_train(&self, id: i64, end: &TrainEnd, at: Millis) -> Result<()> {
        match self {
            AnyStore::Sqlite(s) => s.end_train(id, end, at).await,
            AnyStore::Postgres(s) => s.end_train(id, end, at).await,
        }
    }

    async fn trains_since(&self, since: Millis) -> Result<Vec<TrainStat>> {
        match self {
            AnyStore::Sqlite(s) => s.trains_since(since).await,
            AnyStore::Postgres(s) => s.trains_since(since).await,
        }
    }

    async fn abort_integration(&self, task: &TaskId) -> Result<()> {
        match self {
            AnyStore::Sqlite(s) => s.abort_integration(task).await,
            AnyStore::Postgres(s) => s.abort_integration(task).await,
        }
    }

    async fn pending_integrations(&self) -> Result<Vec<Journal>> {
        match self {
            AnyStore::Sqlite(s) => s.pending_integrations().await,
            AnyStore::Postgres(s) => s.pending_integrations().await,
        }
    }

    async fn running_runs(&self, task: &TaskId) -> Result<Vec<Run>> {
        match self {
            AnyStore::Sqlite(s) => s.running_runs(task).await,
            AnyStore::Postgres(s) => s.running_runs(task).await,
        }
    }

    async fn usage_since(&self, since: Millis, bucket_ms: Millis) -> Result<Vec<UsageBucket>> {
        match self {
            AnyStore::Sqlite(s) => s.usage_since(since, bucket_ms).await,
            AnyStore::Postgres(s) => s.usage_since(since, bucket_ms).await,
        }
    }

    async fn latest_session(&self, task: &TaskId) -> Result<Option<String>> {
        match self {
            AnyStore::Sqlite(s) => s.latest_session(task).await,
            AnyStore::Postgres(s) => s.latest_session(task).await,
        }
    }

    async fn start_run(&self, task: &TaskId, run: &NewRun, at: Millis) -> Result<i64> {
        match self {
            AnyStore::Sqlite(s) => s.start_run(task, run, at).await,
            AnyStore::Postgres(s) => s.start_run(task, run, at).await,
        }
    }

    async fn end_run(&self, run: i64, end: &RunEnd, at: Millis) -> Result<()> {
        match self {
            AnyStore::Sqlite(s) => s.end_run(run, end, at).await,
            AnyStore::Postgres(s) => s.end_run(run, end, at).await,
        }
    }

    async fn abandon_runs(&self, phase: Phase, error: &str, at: Millis) -> Result<u64> {
        match self {
            AnyStore::Sqlite(s) => s.abandon_runs(phase, error, at).await,
            AnyStore::Postgres(s) => s.abandon_runs(phase, error, at).await,
        }
    }

    async fn run(&self, id: i64) -> Result<Option<Run>> {
        match self {
            AnyStore::Sqlite(s) => s.run(id).await,
            AnyStore::Postgres(s) => s.run(id).await,
        }
    }

    async fn append_logs(&self, lines: &[(i64, LogLine)]) -> Result<()> {
        match self {
            AnyStore::Sqlite(s) => s.append_logs(lines).await,
            AnyStore::Postgres(s) => s.append_logs(lines).await,
        }
    }

    async fn last_log_seq(&self, run: i64) -> Result<u64> {
        match self {
            AnyStore::Sqlite(s) => s.last_log_seq(run).await,
            AnyStore::Postgres(s) => s.last_log_seq(run).await,
        }
    }

    async fn read_logs(&self, run: i64, after_seq: u64, limit: u32) -> Result<Vec<LogLine>> {
        match self {
            AnyStore::Sqlite(s) => s.read_logs(run, after_seq, limit).await,
            AnyStore::Postgres(s) => s.read_logs(run, after_seq, limit).await,
        }
    }

    async fn trim_log(&self, run: i64, head_last_seq: u64, keep_tail_bytes: u64) -> Result<u64> {
        match self {
            AnyStore::Sqlite(s) => s.trim_log(run, head_last_seq, keep_tail_bytes).await,
            AnyStore::Postgres(s) => s.trim_log(run, head_last_seq, keep_tail_bytes).await,
        }
    }

    async fn prune_logs(&self, before: Millis) -> Result<u64> {
        match self {
            AnyStore::Sqlite(s) => s.prune_logs(before).await,
            AnyStore::Postgres(s) => s.prune_logs(before).await,
        }
    }

    async fn last_event_id(&self) -> Result<i64> {
        match self {
            AnyStore::Sqlite(s) => s.last_event_id().await,
            AnyStore::Postgres(s) => s.last_event_id().await,
        }
    }

    async fn events_after(&self, after_id: i64, limit: u32) -> Result<Vec<TaskEvent>> {
        match self {
            AnyStore::Sqlite(s) => s.events_after(after_id, limit).await,
            AnyStore::Postgres(s) => s.events_after(after_id, limit).await,
        }
    }

    async fn get_meta(&self, key: &str) -> Result<Option<String>> {
        match self {
            AnyStore::Sqlite(s) => s.get_meta(key).await,
            AnyStore::Postgres(s) => s.get_meta(key).await,
        }
    }

    async fn put_meta(&self, key: &str, value: &str) -> Result<()> {
        match self {
            AnyStore::Sqlite(s) => s.put_meta(key, value).await,
            AnyStore::Postgres(s) => s.put_meta(key, value).await,
        }
    }

    async fn list_meta(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        match self {
            AnyStore::Sqlite(s) => s.list_meta(prefix).await,
            AnyStore::Postgres(s) => s.list_meta(prefix).await,
        }
    }

    fn feed(&self) -> &crate::feed::Feed {
        match self {
            AnyStore::Sqlite(s) => s.feed(),
            AnyStore::Postgres(s) => s.feed(),
        }
    }

    async fn record(&self, entry: &crate::feed::NewEntry) -> Result<i64> {
        match self {
            AnyStore::Sqlite(s) => s.record(entry).await,
            AnyStore::Postgres(s) => s.record(entry).await,
        }
    }

    async fn entries_after(&self, after: i64, limit: u32) -> Result<Vec<crate::feed::FeedEntry>> {
        match self {
            AnyStore::Sqlite(s) => s.entries_after(after, limit).await,
            AnyStore::Postgres(s) => s.entries_after(after, limit).await,
        }
    }

    async fn set_meta_recording(
        &self,
        key: &str,
        value: Option<&str>,
        entry: &crate::feed::NewEntry,
    ) -> Result<i64> {
        match self {
            AnyStore::Sqlite(s) => s.set_meta_recording(key, value, entry).await,
            AnyStore::Postgres(s) => s.set_meta_recording(key, value, entry).await,
        }
    }

    fn write_failure(&self) -> Option<String> {
        match self {
            AnyStore::Sqlite(s) => s.write_failure(),
            AnyStore::Postgres(s) => s.write_failure(),
        }
    }

    async fn check_writable(&self) -> Result<()> {
        match self {
            AnyStore::Sqlite(s) => s.check_writable().await,
            AnyStore::Postgres(s) => s.check_writable().await,
        }
    }

    async fn delete_meta(&self, key: &str) -> Result<()> {
        match self {
            AnyStore::Sqlite(s) => s.delete_meta(key).await,
            AnyStore::Postgres(s) => s.delete_meta(key).await,
        }
    }

    async fn sessions(&self) -> Result<Vec<SessionRecord>> {
        match self {
            AnyStore::Sqlite(s) => s.sessions().await,
            AnyStore::Postgres(s) => s.sessions().await,
        }
    }

    async fn put_session(&self, session: &SessionRecord) -> Result<()> {
        match self {
            AnyStore::Sqlite(s) => s.put_session(session).await,
            AnyStore::Postgres(s) => s.put_session(session).await,
        }
    }

    async fn end_sessions(&self, which: EndSessions<'_>) -> Result<u64> {
        match self {
            AnyStore::Sqlite(s) => s.end_sessions(which).await,
            AnyStore::Postgres(s) => s.end_sessions(which).await,
        }
    }

    async fn webhooks(&self) -> Result<Vec<WebhookCursor>> {
        match self {
            AnyStore::Sqlite(s) => s.webhooks().await,
            AnyStore::Postgres(s) => s.webhooks().await,
        }
    }

    async fn open_webhook(&self, url: &str, head: i64, now: Millis) -> Result<WebhookCursor> {
        match self {
            AnyStore::Sqlite(s) => s.open_webhook(url, head, now).await,
            AnyStore::Postgres(s) => s.open_webhook(url, head, now).await,
        }
    }

    async fn put_webhook(&self, cursor: &WebhookCursor) -> Result<bool> {
        match self {
            AnyStore::Sqlite(s) => s.put_webhook(cursor).await,
            AnyStore::Postgres(s) => s.put_webhook(cursor).await,
        }
    }

    async fn forget_webhook(&self, url: &str) -> Result<bool> {
        match self {
            AnyStore::Sqlite(s) => s.forget_webhook(url).await,
            AnyStore::Postgres(s) => s.forget_webhook(url).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Database;
    use std::path::Path;

    #[test]
    fn sqlite_urls_and_paths_are_sqlite_files() {
        for (url, file) in [
            ("sqlite:///var/p.db", Some("/var/p.db")),
            ("sqlite://rel/p.db?mode=rwc", Some("rel/p.db")),
            ("sqlite:p.db", Some("p.db")),
            ("/var/lib/p.db", Some("/var/lib/p.db")),
            ("p.db", Some("p.db")),
            ("sqlite::memory:", None),
        ] {
            let db = Database::parse(url).expect(url);
            assert_eq!(db.file(), file.map(Path::new), "{url}");
        }
    }

    #[test]
    fn postgres_urls_are_postgres_and_other_schemes_are_refused_with_why() {
        for url in [
            "postgres://u:secret@h/db",
            "postgresql://h/db",
            "postgres://postgres@localhost/db?host=/tmp/pg",
        ] {
            let db = Database::parse(url).expect(url);
            assert_eq!(
                db,
                Database::Postgres {
                    url: url.to_owned()
                }
            );
            assert_eq!(db.file(), None, "{url}");
        }
        let err = Database::parse("postgres://u:secret@h:notaport/db")
            .expect_err("bad port")
            .to_string();
        assert!(err.contains("not a valid PostgreSQL URL"), "{err}");
        assert!(!err.contains("secret"), "no password in the refusal: {err}");
        assert!(!err.contains('\n'), "one line: {err}");
        let err = Database::parse("mysql://h/db")
            .expect_err("mysql")
            .to_string();
        assert!(err.contains("unknown kind of database"), "{err}");
        assert!(err.contains("postgres://"), "{err}");
    }
}
