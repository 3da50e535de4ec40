//! Run logs: appended, read, trimmed and pruned.

use sqlx::Postgres;

use super::PgStore;
use super::rows::corrupt;
use crate::domain::{LogLine, LogStream, Millis, Phase};
use crate::error::Result;

pub(super) async fn append_logs(store: &PgStore, lines: &[(i64, LogLine)]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    // Log lines are no entry of the feed: they do not take the write turn, and nothing is
    // published after this commit.
    let mut tx = store.write_logs().await?;
    // 6 parameters a row: 30,000 a statement, under PostgreSQL's limit of 65,535.
    for chunk in lines.chunks(5000) {
        let mut q = sqlx::QueryBuilder::<Postgres>::new(
            "INSERT INTO log_lines (run_id, seq, at, stream, phase, line) ",
        );
        q.push_values(chunk, |mut row, (run, line)| {
            row.push_bind(*run)
                .push_bind(i64::try_from(line.seq).unwrap_or(i64::MAX))
                .push_bind(line.at)
                .push_bind(line.stream.as_str())
                .push_bind(line.phase.as_str())
                .push_bind(line.text.as_str());
        });
        q.push(" ON CONFLICT DO NOTHING");
        q.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn last_log_seq(store: &PgStore, run: i64) -> Result<u64> {
    let top: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM log_lines WHERE run_id = $1")
        .bind(run)
        .fetch_one(&store.pool)
        .await?;
    Ok(top.unwrap_or(0).unsigned_abs())
}

pub(super) async fn read_logs(
    store: &PgStore,
    run: i64,
    after_seq: u64,
    limit: u32,
) -> Result<Vec<LogLine>> {
    let rows: Vec<(i64, i64, String, String, String)> = sqlx::query_as(
        "SELECT seq, at, stream, phase, line FROM log_lines \
         WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(run)
    .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
    .bind(i64::from(limit))
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter()
        .map(|(seq, at, stream, phase, text)| {
            Ok(LogLine {
                seq: seq.unsigned_abs(),
                at,
                stream: LogStream::parse(&stream).ok_or_else(|| corrupt("log stream", &stream))?,
                phase: Phase::parse(&phase).ok_or_else(|| corrupt("phase", &phase))?,
                text,
            })
        })
        .collect()
}

pub(super) async fn trim_log(
    store: &PgStore,
    run: i64,
    head_last_seq: u64,
    keep_tail_bytes: u64,
) -> Result<u64> {
    let mut tx = store.write_logs().await?;
    let head = i64::try_from(head_last_seq).unwrap_or(i64::MAX);
    let keep = i64::try_from(keep_tail_bytes).unwrap_or(i64::MAX);
    sqlx::query(
        "DELETE FROM log_lines WHERE run_id = $1 AND seq IN ( \
            SELECT seq FROM ( \
                SELECT seq, SUM(octet_length(line) + 1) \
                    OVER (ORDER BY seq DESC) AS newer \
                FROM log_lines WHERE run_id = $1 AND seq > $2) AS tail \
            WHERE newer > $3)",
    )
    .bind(run)
    .bind(head)
    .bind(keep)
    .execute(&mut *tx)
    .await?;
    let kept: Option<i64> = sqlx::query_scalar(
        "SELECT SUM(octet_length(line) + 1) FROM log_lines WHERE run_id = $1 AND seq > $2",
    )
    .bind(run)
    .bind(head)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(kept.unwrap_or(0).unsigned_abs())
}

pub(super) async fn prune_logs(store: &PgStore, before: Millis) -> Result<u64> {
    let mut tx = store.write_logs().await?;
    let done = sqlx::query(
        "DELETE FROM log_lines WHERE run_id IN ( \
            SELECT id FROM runs WHERE finished_at IS NOT NULL AND finished_at < $1)",
    )
    .bind(before)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}
