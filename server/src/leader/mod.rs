//! Leadership among servers on one PostgreSQL database (issue 28): which server leads, with
//! which term, and until when it may write.
//!
//! The lease is one row, `leader_lease` (`migrations/postgres/0100_leader.sql`): taken when it
//! has expired, with `term + 1`; renewed by its holder; both on the database's clock (`now()`),
//! never a session advisory lock. The holder keeps a deadline of its own: the local monotonic
//! time at the start of its last successful renewal, plus the TTL, less a margin. Past it without
//! another renewal (cut off from the database, or frozen), [`Leadership::may_write`] is false:
//! the server writes nothing more, whatever it learns later. The database has the last word: every
//! write of the leader runs [`FENCE_SQL`] with its term in the write's own transaction, which
//! refuses a term that no longer holds a live lease (and orders the write before any takeover).
//!
//! A SQLite server is alone with its database: [`Leadership::sole`] leads for good, term 1.
//!
//! Architecture invariant: only the [`Elector`] changes the role, but for a write the fence
//! refused ([`Leadership::lost`], which only ends a term); the store's one `begin_write` asks
//! [`Leadership::writing_term`] and runs [`FENCE_SQL`] with that term.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The lease's table and the fence function, for a database that lacks them (PgStore's
/// migrations include the same file; tests apply it with `sqlx::raw_sql`).
pub const MIGRATION: &str = concat!(
    include_str!("../../migrations/postgres/0100_leader.sql"),
    include_str!("../../migrations/postgres/0101_leader_fence_key_share.sql"),
);

/// The statement a write transaction runs first, with the writer's term as `$1`: it fails
/// (SQLSTATE [`FENCED_SQLSTATE`]) unless that term holds a live lease.
pub const FENCE_SQL: &str = "SELECT pipeline_leader_fence($1)";

/// The SQLSTATE of a write refused by the fence.
pub const FENCED_SQLSTATE: &str = "PLF01";

/// What this server is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// It leads, in this term: it leases, accepts results, integrates and writes.
    Leader { term: i64 },
    /// Another server leads (at `leader_url`, its `--advertise` URL, when one is known): this one
    /// serves reads and refuses runner calls and writes naming it.
    Standby { leader_url: Option<String> },
}

impl Role {
    /// `leader` or `standby`, as `status --json` says it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Leader { .. } => "leader",
            Role::Standby { .. } => "standby",
        }
    }
}

/// The settings of an election.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long a lease lasts from its last renewal (`--leader-ttl`).
    pub ttl: Duration,
    /// Where clients reach this server (`--advertise`), for standbys to name.
    pub advertise: String,
}

impl Settings {
    /// How long before the lease's end the holder stops writing: a fifth of the TTL, for a
    /// renewal's round trip and the two clocks' drift.
    pub fn margin(&self) -> Duration {
        self.ttl / 5
    }

    /// How often the holder renews and a standby looks: a third of the TTL, so that two
    /// renewals can fail before the holder's deadline.
    pub fn period(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(10))
    }
}

/// What the elector and the readers of the role share: the term this server leads in (0: none)
/// and its local deadline, read without a lock on every write.
#[derive(Debug)]
struct Shared {
    term: AtomicI64,
    /// Nanoseconds after `base` until which the leader may write.
    deadline: AtomicU64,
    base: Instant,
    /// A sole leader (SQLite) has no deadline.
    sole: bool,
}

/// The role of this server, for the rest of it: a watch of [`Role`] and the write check.
#[derive(Clone, Debug)]
pub struct Leadership {
    shared: Arc<Shared>,
    role: watch::Receiver<Role>,
    /// The elector's sender, for a write the fence refused to end the term at once (`None`:
    /// a fixed role).
    steer: Option<Arc<watch::Sender<Role>>>,
}

impl Leadership {
    /// A server alone with its database (SQLite): the leader for good, term 1.
    pub fn sole() -> Self {
        Self::fixed(Role::Leader { term: 1 })
    }

    /// A role that never changes (a leader with no deadline): a sole server's, and tests'.
    pub fn fixed(role: Role) -> Self {
        let term = match role {
            Role::Leader { term } => term,
            Role::Standby { .. } => 0,
        };
        let (tx, role) = watch::channel(role);
        // Nothing will change it: the receiver keeps the value after the sender is gone.
        drop(tx);
        Self {
            shared: Arc::new(Shared {
                term: AtomicI64::new(term),
                deadline: AtomicU64::new(u64::MAX),
                base: Instant::now(),
                sole: true,
            }),
            role,
            steer: None,
        }
    }

    /// The database refused a write in `term` (the fence: another server took the lease): this
    /// server writes nothing more in it and is a standby until the elector learns more. A
    /// sole or fixed leader is never fenced.
    pub fn lost(&self, term: i64) {
        let Some(steer) = &self.steer else { return };
        let s = &self.shared;
        if s.term
            .compare_exchange(term, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        s.deadline.store(0, Ordering::Release);
        tracing::warn!(
            term,
            "the database refused a write in this term: this server no longer leads"
        );
        steer.send_replace(Role::Standby { leader_url: None });
    }

    /// Whether a write in `term` may go ahead now: this server leads in `term` and its local
    /// deadline has not passed. Cheap (two atomic loads and a clock read).
    pub fn may_write(&self, term: i64) -> bool {
        let s = &self.shared;
        if s.term.load(Ordering::Acquire) != term || term == 0 {
            return false;
        }
        if s.sole {
            return true;
        }
        let now = u64::try_from(s.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        now < s.deadline.load(Ordering::Acquire)
    }

    /// The term to write in, when this server leads now (and its deadline has not passed).
    pub fn writing_term(&self) -> Option<i64> {
        let term = self.shared.term.load(Ordering::Acquire);
        self.may_write(term).then_some(term)
    }

    /// Whether an elector steers this leadership (several servers may share the database),
    /// not a sole or fixed one.
    pub fn is_elected(&self) -> bool {
        self.steer.is_some()
    }

    /// The role now.
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// A watch of the role, changed by the elector.
    pub fn watch(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }
}

/// A failure of the elector's database calls.
#[derive(Debug, thiserror::Error)]
#[error("the leader lease: {0}")]
pub struct LeaseError(#[from] sqlx::Error);

/// Who leads now, as the lease row says: its term and `--advertise` URL, while its lease is live.
pub async fn live_leader(pool: &PgPool) -> Result<Option<(i64, String)>, LeaseError> {
    let row: Option<(i64, String)> = sqlx::query_as(
        "SELECT term, advertise FROM leader_lease WHERE id = 1 AND expires_at > now()",
    )
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

/// At start-up, before the server changes anything: a server that would join a live leader
/// without `--push-remote` is refused, saying why (a standby takes over from the remote the
/// leader pushes to; without one it would take over a base it never saw land).
pub async fn check_joining(pool: &PgPool, push_remote: bool) -> Result<(), String> {
    if push_remote {
        return Ok(());
    }
    match live_leader(pool).await {
        Ok(None) => Ok(()),
        Ok(Some((term, url))) => Err(format!(
            "another server leads this database (term {term}, at {url}) and this one has no \
             --push-remote: a standby takes over from the remote the leader pushes to; start \
             every server of the group with --push-remote naming the same remote"
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// What ends the place at the start of a lease's holder.
const PLACE_END: &str = " | ";

/// A server restarted at `place` (its machine and state dir, whose lock it holds: the process
/// before it there is gone) ends the lease that process may have left live, instead of waiting
/// it out (or being refused as if another server led). The dead holder's term stays fenced; the
/// next to take the lease leads in a higher one. Returns whether there was one.
pub async fn end_own_lease(pool: &PgPool, place: &str) -> Result<bool, LeaseError> {
    if place.is_empty() {
        return Ok(false);
    }
    let ended = sqlx::query(
        "UPDATE leader_lease SET expires_at = now()
         WHERE id = 1 AND expires_at > now() AND starts_with(holder, $1)",
    )
    .bind(format!("{place}{PLACE_END}"))
    .execute(pool)
    .await?;
    Ok(ended.rows_affected() > 0)
}

/// Holds, renews and takes the lease for one server.
pub struct Elector {
    pool: PgPool,
    settings: Settings,
    /// This process: unique among the servers (its advertise URL, host, PID and a start time).
    holder: String,
    shared: Arc<Shared>,
    role: Arc<watch::Sender<Role>>,
}

impl Elector {
    /// An elector for this server on `pool`'s database (whose `leader_lease` exists), and the
    /// leadership it steers, a standby until it first takes the lease.
    pub fn new(pool: PgPool, settings: Settings) -> (Self, Leadership) {
        Self::placed(pool, settings, "")
    }

    /// As [`Elector::new`], for a server at `place` (its machine and state dir, see
    /// [`end_own_lease`]), which the lease's holder names first.
    pub fn placed(pool: PgPool, settings: Settings, place: &str) -> (Self, Leadership) {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let holder = format!(
            "{place}{PLACE_END}{} pid {} at {started}",
            settings.advertise,
            std::process::id()
        );
        let shared = Arc::new(Shared {
            term: AtomicI64::new(0),
            deadline: AtomicU64::new(0),
            base: Instant::now(),
            sole: false,
        });
        let (role, rx) = watch::channel(Role::Standby { leader_url: None });
        let role = Arc::new(role);
        let leadership = Leadership {
            shared: shared.clone(),
            role: rx,
            steer: Some(Arc::clone(&role)),
        };
        (
            Self {
                pool,
                settings,
                holder,
                shared,
                role,
            },
            leadership,
        )
    }

    /// This process as the lease's `holder` names it.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.shared.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// When the local deadline passes (`None`: not leading).
    pub fn deadline(&self) -> Option<Instant> {
        if self.shared.term.load(Ordering::Acquire) == 0 {
            return None;
        }
        let nanos = self.shared.deadline.load(Ordering::Acquire);
        Some(self.shared.base + Duration::from_nanos(nanos))
    }

    fn lead(&self, term: i64, renew_started: Instant) {
        let deadline = renew_started + self.settings.ttl.saturating_sub(self.settings.margin());
        // The deadline first, then the term: a reader that sees the new term sees its deadline.
        self.shared
            .deadline
            .store(self.nanos(deadline), Ordering::Release);
        self.shared.term.store(term, Ordering::Release);
        self.role.send_if_modified(|role| {
            let new = Role::Leader { term };
            let changed = *role != new;
            if changed {
                tracing::info!(term, "this server leads");
                *role = new;
            }
            changed
        });
    }

    fn stand_by(&self, leader_url: Option<String>) {
        self.shared.term.store(0, Ordering::Release);
        self.shared.deadline.store(0, Ordering::Release);
        self.role.send_if_modified(|role| {
            let new = Role::Standby {
                leader_url: leader_url.clone(),
            };
            let changed = *role != new;
            if changed {
                if matches!(role, Role::Leader { .. }) {
                    tracing::warn!(leader = ?leader_url, "this server no longer leads");
                }
                *role = new;
            }
            changed
        });
    }

    /// One round: the leader renews, a standby takes an expired lease or learns who leads.
    /// Past the leader's deadline without a renewal, it is a standby (and writes nothing).
    /// Returns when to run the next round.
    pub async fn step(&self) -> Instant {
        let started = Instant::now();
        let term = self.shared.term.load(Ordering::Acquire);
        let ttl_ms = i64::try_from(self.settings.ttl.as_millis()).unwrap_or(i64::MAX);
        let result = if term != 0 {
            self.renew(term, ttl_ms).await.map(|renewed| {
                if renewed {
                    self.lead(term, started);
                } else {
                    // Another server took it (this one's lease had expired): a standby.
                    self.stand_by(None);
                }
            })
        } else {
            self.try_acquire(ttl_ms)
                .await
                .map(|acquired| match acquired {
                    Ok(term) => self.lead(term, started),
                    Err(leader_url) => self.stand_by(leader_url),
                })
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot reach the database for the leader lease");
        }
        // A deadline passed without a renewal: stop leading (may_write is already false).
        if let Some(deadline) = self.deadline()
            && Instant::now() >= deadline
        {
            self.stand_by(None);
        }
        let next = started + self.settings.period();
        match self.deadline() {
            Some(deadline) => next.min(deadline),
            None => next,
        }
    }

    /// Renews this server's lease in `term`; false when it is no longer its own.
    async fn renew(&self, term: i64, ttl_ms: i64) -> Result<bool, LeaseError> {
        let renewed = sqlx::query_scalar::<_, i64>(
            "UPDATE leader_lease
             SET expires_at = now() + $3 * interval '1 millisecond'
             WHERE id = 1 AND holder = $1 AND term = $2 AND expires_at > now()
             RETURNING term",
        )
        .bind(&self.holder)
        .bind(term)
        .bind(ttl_ms)
        .fetch_optional(&self.pool)
        .await?;
        Ok(renewed.is_some())
    }

    /// Takes the lease if it has expired: `Ok(term)`, or `Err(the leader's URL)` when another
    /// server holds it.
    async fn try_acquire(&self, ttl_ms: i64) -> Result<Result<i64, Option<String>>, LeaseError> {
        // FOR UPDATE first: it waits for every write the fence let in (they hold the row FOR
        // KEY SHARE, which the renewal's UPDATE passes but this lock does not), so a write of
        // the old term is ordered before the new term.
        let mut tx = self.pool.begin().await?;
        let expired: Option<i32> = sqlx::query_scalar(
            "SELECT id FROM leader_lease WHERE id = 1 AND expires_at <= now() FOR UPDATE",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let taken = match expired {
            None => None,
            Some(_) => {
                sqlx::query_scalar::<_, i64>(
                    "UPDATE leader_lease
                     SET term = term + 1, holder = $1, advertise = $2,
                         expires_at = now() + $3 * interval '1 millisecond'
                     WHERE id = 1 AND expires_at <= now()
                     RETURNING term",
                )
                .bind(&self.holder)
                .bind(&self.settings.advertise)
                .bind(ttl_ms)
                .fetch_optional(&mut *tx)
                .await?
            }
        };
        tx.commit().await?;
        if let Some(term) = taken {
            return Ok(Ok(term));
        }
        // A live lease of this very process (its term lost or its deadline passed, the row
        // not expired yet) names no leader: clients told to come here would only be refused
        // again.
        let leader: Option<(String, bool, bool)> = sqlx::query_as(
            "SELECT advertise, expires_at > now(), holder = $1 FROM leader_lease WHERE id = 1",
        )
        .bind(&self.holder)
        .fetch_optional(&self.pool)
        .await?;
        Ok(Err(leader.and_then(|(url, live, own)| {
            (live && !own && !url.is_empty()).then_some(url)
        })))
    }

    /// Runs rounds until `stop`; at the end, a leader gives the lease up (its term stays
    /// fenced) so that a standby need not wait out the TTL.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            let next = self.step().await;
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep_until(next) => {}
            }
        }
        let term = self.shared.term.load(Ordering::Acquire);
        self.stand_by(None);
        if term != 0 {
            let given_up = sqlx::query(
                "UPDATE leader_lease SET expires_at = now()
                 WHERE id = 1 AND holder = $1 AND term = $2",
            )
            .bind(&self.holder)
            .bind(term)
            .execute(&self.pool)
            .await;
            if let Err(e) = given_up {
                tracing::warn!(error = %e, "cannot give up the leader lease; it expires by itself");
            }
        }
    }
}

#[cfg(test)]
mod tests;
