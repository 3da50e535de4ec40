//! The lease on a real PostgreSQL (`pipeline_core::pgtest`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use pipeline_core::pgtest::PgServer;
use sqlx::postgres::PgPoolOptions;

use super::*;

async fn pool(url: &str) -> PgPool {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(url)
        .await
        .expect("connect to the test PostgreSQL");
    sqlx::raw_sql(MIGRATION)
        .execute(&pool)
        .await
        .expect("the leader migration");
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS written (term BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .expect("a table to write");
    pool
}

/// Migrated once per database: the other electors share the first's pool.
fn elector(pool: &PgPool, name: &str, ttl: Duration) -> (Elector, Leadership) {
    Elector::new(
        pool.clone(),
        Settings {
            ttl,
            advertise: format!("http://{name}:50051"),
        },
    )
}

/// A write as the store makes it: the fence with `term`, then the row, in one transaction.
async fn fenced_write(pool: &PgPool, term: i64) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(FENCE_SQL).bind(term).execute(&mut *tx).await?;
    sqlx::query("INSERT INTO written (term) VALUES ($1)")
        .bind(term)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

fn is_fenced(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == FENCED_SQLSTATE)
}

async fn written(pool: &PgPool, term: i64) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM written WHERE term = $1")
        .bind(term)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Runs `elector`'s rounds on its own schedule until `done` holds, with a deadline.
async fn step_until(elector: &Elector, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "no change within 30 s");
        let next = elector.step().await;
        tokio::time::sleep_until(next).await;
    }
}

#[tokio::test]
async fn the_first_contender_leads_and_a_takeover_raises_the_term() {
    let db = PgServer::shared().database();
    let pool = pool(db.url()).await;
    let ttl = Duration::from_millis(600);
    let (a, a_role) = elector(&pool, "a", ttl);
    let (b, b_role) = elector(&pool, "b", ttl);

    a.step().await;
    assert_eq!(a_role.role(), Role::Leader { term: 1 });
    assert!(a_role.may_write(1));
    assert_eq!(a_role.writing_term(), Some(1));
    b.step().await;
    assert_eq!(
        b_role.role(),
        Role::Standby {
            leader_url: Some("http://a:50051".to_owned())
        }
    );
    assert!(!b_role.may_write(1) && b_role.writing_term().is_none());
    // The leader renews: still term 1, and the standby stays one.
    a.step().await;
    b.step().await;
    assert_eq!(a_role.role(), Role::Leader { term: 1 });
    assert!(matches!(b_role.role(), Role::Standby { .. }));

    // A stops renewing (frozen): B takes over once the lease has expired, in term 2.
    step_until(&b, || b_role.role() == Role::Leader { term: 2 }).await;
    assert!(b_role.may_write(2) && !b_role.may_write(1));
    // A, back, finds its lease gone and stands by: it writes nothing in term 1.
    a.step().await;
    assert!(matches!(a_role.role(), Role::Standby { .. }));
    assert!(!a_role.may_write(1));
    a.step().await;
    assert_eq!(
        a_role.role(),
        Role::Standby {
            leader_url: Some("http://b:50051".to_owned())
        }
    );
}

#[tokio::test]
async fn a_frozen_holder_stops_writing_at_its_deadline_and_its_old_term_is_fenced_in_sql() {
    let db = PgServer::shared().database();
    let pool = pool(db.url()).await;
    let (a, a_role) = elector(&pool, "a", Duration::from_millis(500));
    a.step().await;
    assert_eq!(a_role.writing_term(), Some(1));
    fenced_write(&pool, 1).await.expect("the leader writes");
    assert_eq!(written(&pool, 1).await, 1);

    // No renewal from here (the holder is frozen): its own deadline ends its writes...
    let deadline = a.deadline().expect("a leader has a deadline");
    let give_up = Instant::now() + Duration::from_secs(30);
    while a_role.may_write(1) {
        assert!(Instant::now() < give_up, "may_write never turned false");
        tokio::time::sleep_until(deadline).await;
    }
    assert!(Instant::now() >= deadline);
    assert_eq!(a_role.writing_term(), None);
    // ...and once the lease has expired on the database's clock, the database refuses a write
    // in its term, whatever the writer believes.
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let live: bool =
            sqlx::query_scalar("SELECT expires_at > now() FROM leader_lease WHERE id = 1")
                .fetch_one(&pool)
                .await
                .expect("read the lease");
        if !live {
            break;
        }
        assert!(Instant::now() < give_up, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = fenced_write(&pool, 1).await.expect_err("a lapsed term");
    assert!(is_fenced(&refused), "{refused}");
    assert_eq!(
        written(&pool, 1).await,
        1,
        "nothing written after the lease"
    );

    // A new holder takes term 2: its writes go in, the old term's stay out.
    let (b, b_role) = elector(&pool, "b", Duration::from_millis(500));
    b.step().await;
    assert_eq!(b_role.role(), Role::Leader { term: 2 });
    fenced_write(&pool, 2).await.expect("the new leader writes");
    let refused = fenced_write(&pool, 1).await.expect_err("the old term");
    assert!(is_fenced(&refused), "{refused}");
    assert_eq!((written(&pool, 1).await, written(&pool, 2).await), (1, 1));
    // The frozen holder, resumed, does not renew its way back: it is a standby.
    a.step().await;
    assert!(matches!(a_role.role(), Role::Standby { .. }));
}

/// A busy leader's writes overlap without a gap, each holding the fence's lock on the lease row
/// to its end: the holder's renewal must pass them, or its deadline passes under load and the
/// only server steps down (seen in pipeline-bench's backends figure before 0101).
#[tokio::test]
async fn the_holder_renews_while_a_write_the_fence_let_in_is_still_open() {
    let db = PgServer::shared().database();
    let pool = pool(db.url()).await;
    let (a, a_role) = elector(&pool, "a", Duration::from_secs(10));
    a.step().await;
    assert_eq!(a_role.role(), Role::Leader { term: 1 });
    let before: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM expires_at)::float8 FROM leader_lease")
            .fetch_one(&pool)
            .await
            .expect("expires_at");
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(FENCE_SQL)
        .bind(1_i64)
        .execute(&mut *tx)
        .await
        .expect("the fence");
    // The renewal completes with the write still open (it would wait for ever on FOR SHARE).
    tokio::time::timeout(Duration::from_secs(30), a.step())
        .await
        .expect("the renewal waited on the open write");
    assert_eq!(a_role.role(), Role::Leader { term: 1 });
    let after: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM expires_at)::float8 FROM leader_lease")
            .fetch_one(&pool)
            .await
            .expect("expires_at");
    assert!(after > before, "renewed: {before} -> {after}");
    tx.commit().await.expect("the write commits");
}

#[tokio::test]
async fn a_write_the_fence_let_in_is_ordered_before_the_takeover() {
    let db = PgServer::shared().database();
    let pool = pool(db.url()).await;
    let ttl = Duration::from_millis(300);
    let (a, a_role) = elector(&pool, "a", ttl);
    a.step().await;
    assert_eq!(a_role.role(), Role::Leader { term: 1 });
    // A write passes the fence and is still open when the lease expires.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(FENCE_SQL)
        .bind(1_i64)
        .execute(&mut *tx)
        .await
        .expect("the fence");
    sqlx::query("INSERT INTO written (term) VALUES (1)")
        .execute(&mut *tx)
        .await
        .expect("insert");
    let (b, b_role) = elector(&pool, "b", ttl);
    let b = Arc::new(b);
    let contender = tokio::spawn({
        let b = b.clone();
        let b_role = b_role.clone();
        async move { step_until(&b, || b_role.role() == Role::Leader { term: 2 }).await }
    });
    // The takeover waits on the write's lock on the lease row.
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .expect("pg_stat_activity");
        if waiting > 0 {
            break;
        }
        assert!(Instant::now() < give_up, "the takeover never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(b_role.role(), Role::Standby { .. }));
    tx.commit().await.expect("the write commits");
    contender.await.expect("the contender");
    assert_eq!(b_role.role(), Role::Leader { term: 2 });
    assert_eq!(written(&pool, 1).await, 1);
}

#[tokio::test]
async fn two_contenders_never_both_lead() {
    let db = PgServer::shared().database();
    let pool = pool(db.url()).await;
    let ttl = Duration::from_millis(300);
    // For each term: who held it, when it first could write, and its last deadline.
    type Held = BTreeMap<i64, (usize, Instant, Instant)>;
    let terms: Arc<Mutex<Held>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let (e, role) = elector(&pool, &format!("s{i}"), ttl);
        let terms = terms.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..25_usize {
                // Now and then a server freezes for longer than the TTL.
                if (k + 7 * i) % 9 == 0 {
                    tokio::time::sleep(ttl + ttl / 2).await;
                }
                let next = e.step().await;
                let now = Instant::now();
                if let (Some(term), Some(deadline)) = (role.writing_term(), e.deadline()) {
                    let mut terms = terms.lock().expect("terms");
                    let entry = terms.entry(term).or_insert((i, now, deadline));
                    assert_eq!(entry.0, i, "term {term} held by two servers");
                    entry.2 = entry.2.max(deadline);
                }
                tokio::time::sleep_until(next).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("a contender");
    }
    let terms = terms.lock().expect("terms");
    assert!(terms.len() >= 2, "no takeover happened: {terms:?}");
    let mut last: Option<(i64, Instant)> = None;
    for (&term, &(_, start, end)) in terms.iter() {
        if let Some((before, before_end)) = last {
            assert!(term > before);
            assert!(
                before_end <= start,
                "term {before} could still write when term {term} began"
            );
        }
        last = Some((term, end));
    }
}

#[tokio::test]
async fn a_server_without_a_push_remote_may_not_join_a_live_leader() {
    let db = PgServer::shared().database();
    let pool = pool(db.url()).await;
    // No leader yet: the first server may start with or without a remote.
    assert_eq!(live_leader(&pool).await.expect("read"), None);
    assert_eq!(check_joining(&pool, false).await, Ok(()));
    let (a, _a_role) = elector(&pool, "a", Duration::from_secs(30));
    a.step().await;
    assert_eq!(
        live_leader(&pool).await.expect("read"),
        Some((1, "http://a:50051".to_owned()))
    );
    let refused = check_joining(&pool, false)
        .await
        .expect_err("a live leader");
    assert!(
        refused.contains("term 1, at http://a:50051") && refused.contains("--push-remote"),
        "{refused}"
    );
    assert_eq!(check_joining(&pool, true).await, Ok(()));
    // Once the leader has stopped (its lease given up), a server may start alone again.
    let stop = CancellationToken::new();
    stop.cancel();
    a.run(stop).await;
    assert_eq!(live_leader(&pool).await.expect("read"), None);
    assert_eq!(check_joining(&pool, false).await, Ok(()));
}

/// A server restarted in the same place (machine and state dir) ends the lease its killed
/// predecessor left live; a server elsewhere ends nothing.
#[tokio::test]
async fn a_restart_in_the_same_place_ends_its_predecessors_lease_and_no_other() {
    let db = PgServer::shared().database();
    let pool = pool(db.url()).await;
    let settings = Settings {
        ttl: Duration::from_secs(60),
        advertise: "http://a:50051".to_owned(),
    };
    let (killed, role) = Elector::placed(pool.clone(), settings, "m1 /srv/a");
    killed.step().await;
    assert_eq!(role.role(), Role::Leader { term: 1 });
    drop(killed);
    assert!(!end_own_lease(&pool, "m1 /srv/b").await.expect("end"));
    assert!(!end_own_lease(&pool, "m2 /srv/a").await.expect("end"));
    assert!(!end_own_lease(&pool, "").await.expect("end"));
    assert!(live_leader(&pool).await.expect("read").is_some());
    assert!(end_own_lease(&pool, "m1 /srv/a").await.expect("end"));
    assert_eq!(live_leader(&pool).await.expect("read"), None);
    assert!(is_fenced(
        &fenced_write(&pool, 1).await.expect_err("term 1 is over")
    ));
}

/// A server whose term ended while its lease row is still live (the fence refused a write, or
/// its deadline passed before the row's expiry) is a standby that names no leader until the
/// row expires: naming itself would send its clients back to be refused again.
#[tokio::test]
async fn a_server_that_lost_its_term_does_not_name_itself_the_leader() {
    let db = PgServer::shared().database();
    let pool = pool(db.url()).await;
    let (a, a_role) = elector(&pool, "a", Duration::from_secs(30));
    a.step().await;
    assert_eq!(a_role.role(), Role::Leader { term: 1 });
    a_role.lost(1);
    a.step().await;
    assert_eq!(a_role.role(), Role::Standby { leader_url: None });
    // Another server names it while its lease lives.
    let (b, b_role) = elector(&pool, "b", Duration::from_secs(30));
    b.step().await;
    assert_eq!(
        b_role.role(),
        Role::Standby {
            leader_url: Some("http://a:50051".to_owned())
        }
    );
}
