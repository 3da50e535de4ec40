//! Credentials and roles. Four kinds of token, each a random 256-bit value with a prefix that
//! says what it is: the admin token (`pla_…`, the control API), the viewer token (`plv_…`, the
//! control API's read calls and the web page, read-only), the runner registration token
//! (`plr_…`, good only to register), and a runner's own credential (`plc_…`, issued at
//! registration, good only for the runner API and only for that runner's leases).
//!
//! The admin, viewer and registration tokens live in files of mode 0600 in the state dir; the
//! database holds only SHA-256 hashes, and runner credentials exist nowhere but on their
//! runner. Checking a token is a hash and a map lookup in memory, in a gRPC interceptor (or the
//! HTTP server's extractor).
//!
//! Sessions of the web page (`POST /login` with the admin or viewer token) are random IDs
//! (`pls_…`) kept in the browser's cookie; the database keeps each one's SHA-256, its role, the
//! hash of the token that opened it and its end (`sessions`), and memory a copy, loaded at
//! start-up. A session ends at its end, at `POST /logout`, or when its token is rotated
//! (`pipelinectl token rotate --viewer`, or a new admin token made at start-up): sessions whose
//! token is no longer current are dropped when the server starts.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::store::{EndSessions, SessionRecord, Store};

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Admin,
    /// The holder of the viewer token (or a session it opened): may read, not change.
    Viewer,
    /// The holder of the registration token: may only register.
    Registration,
    /// A registered runner, by name.
    Runner(String),
}

const ADMIN_FILE: &str = "admin.token";
const VIEWER_FILE: &str = "viewer.token";
const REGISTRATION_FILE: &str = "runner-registration.token";
const RUNNER_KEY: &str = "runner_credential:";
/// A revoked runner's name: it cannot be registered again until forgotten.
const REVOKED_KEY: &str = "runner_revoked:";
/// A runner name whose credential has not opened a work stream yet, with when it was issued
/// (ms since the epoch): freed after [`Auth::free_unconnected_after_ms`].
const UNCONNECTED_KEY: &str = "runner_unconnected:";
/// How long a name registered with the registration token stays reserved if its runner never
/// connects (opens its work stream), unless the server says otherwise
/// (`--free-unconnected-names-after`).
pub const FREE_UNCONNECTED_AFTER_MS: i64 = 3_600_000;

/// A new random token with `prefix`.
pub fn new_token(prefix: &str) -> Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::Internal(format!("cannot read /dev/urandom: {e}")))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{prefix}{hex}"))
}

/// The SHA-256 of a token, in hex.
pub fn hash(token: &str) -> String {
    // Every call is authenticated through this: one allocation, no formatting machinery.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(64);
    for b in Sha256::digest(token.as_bytes()) {
        hex.push(char::from(HEX[usize::from(b >> 4)]));
        hex.push(char::from(HEX[usize::from(b & 15)]));
    }
    hex
}

/// Writes `token` to `path`, readable by its owner only.
fn write_secret(path: &Path, token: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Internal(format!("cannot write {}: {e}", path.display())))?;
    f.write_all(format!("{token}\n").as_bytes())
        .map_err(|e| Error::Internal(format!("cannot write {}: {e}", path.display())))
}

/// Reads the token in `path`, or makes one with `prefix` and writes it there.
fn load_or_create(path: &Path, prefix: &str) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if t.trim().starts_with(prefix) => Ok(t.trim().to_owned()),
        _ => {
            let token = new_token(prefix)?;
            write_secret(path, &token)?;
            Ok(token)
        }
    }
}

/// How a server's tokens (admin, viewer, registration) and their hashes in the database are
/// reconciled.
struct Tokens {
    /// Whether this server may write the database (a leader, or a server alone).
    writing: bool,
    /// Whether the database is shared by a group of servers (PostgreSQL, issue 28).
    group: bool,
}

/// The hashes one kind of token is accepted by: the group's (in the database) and this
/// server's own (its state dir's file); the same alone.
#[derive(Clone, Debug)]
struct TokenHash {
    group: String,
    own: String,
}

impl TokenHash {
    fn one(h: String) -> Self {
        Self {
            group: h.clone(),
            own: h,
        }
    }

    fn is(&self, h: &str) -> bool {
        h == self.group || h == self.own
    }
}

impl Tokens {
    /// The hashes of one token. The state dir's file is the server's own (made on first start,
    /// and made again when deleted). Alone, the database learns its hash. In a group the tokens
    /// live in the database: the first server's are the group's and work against every server
    /// of the group, each server also taking its own file's (a local `pipelinectl`'s).
    async fn hash<S: Store>(
        &self,
        store: &S,
        file: &Path,
        prefix: &str,
        key: &str,
    ) -> Result<TokenHash> {
        let own = hash(&load_or_create(file, prefix)?);
        if self.group
            && let Some(group) = store.get_meta(key).await?
        {
            return Ok(TokenHash { group, own });
        }
        if self.writing {
            store.put_meta(key, &own).await?;
        }
        Ok(TokenHash::one(own))
    }
}

/// A live session of the web page, in memory (keyed by its ID's hash).
#[derive(Clone, Debug)]
struct Session {
    caller: Caller,
    /// The hash of the token that opened it.
    token: String,
    expires_at: i64,
}

/// How long a session of the web page lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

struct State {
    admin: TokenHash,
    viewer: TokenHash,
    registration: TokenHash,
    /// Session ID hash → the session.
    sessions: HashMap<String, Session>,
    /// Credential hash → runner name.
    runners: HashMap<String, String>,
    /// Names of revoked runners (until `pipelinectl runners forget`).
    revoked: std::collections::HashSet<String>,
    /// Names whose credential never opened a work stream: name → when it was issued, and the
    /// same in the order they are freed in.
    unconnected: HashMap<String, i64>,
    unconnected_by_age: std::collections::BTreeSet<(i64, String)>,
    /// Recent registrations per key (a credential, `address:…`, `name:…`), for the rate limits.
    registrations: HashMap<String, VecDeque<Instant>>,
    /// Past this many keys, those without a registration in the last minute are dropped.
    sweep_at: usize,
}

impl State {
    /// Sets (`Some(issued at)`) or clears (`None`) that `name` has not connected yet.
    fn unconnect(&mut self, name: &str, issued_at: Option<i64>) {
        if let Some(at) = self.unconnected.remove(name) {
            self.unconnected_by_age.remove(&(at, name.to_owned()));
        }
        if let Some(at) = issued_at {
            self.unconnected.insert(name.to_owned(), at);
            self.unconnected_by_age.insert((at, name.to_owned()));
        }
    }
}

/// The window of the registration rate limits.
const WINDOW: Duration = Duration::from_secs(60);
/// Registrations allowed per minute from one source address unless set otherwise.
pub const DEFAULT_REGISTRATIONS_PER_ADDRESS: usize = 60;
/// Registrations allowed per minute under one runner name unless set otherwise.
pub const DEFAULT_REGISTRATIONS_PER_NAME: usize = 20;

/// The server's credentials.
pub struct Auth {
    state: RwLock<State>,
    pub admin_file: PathBuf,
    pub viewer_file: PathBuf,
    pub registration_file: PathBuf,
    /// Registrations allowed per minute from one credential (the shared registration token,
    /// or a runner's own): generous, since the whole fleet shares the token.
    pub max_registrations_per_minute: usize,
    /// Registrations allowed per minute from one source address (an IPv6 /64 counts as one):
    /// strict, so that one host cannot use up the token's allowance.
    pub max_registrations_per_address: usize,
    /// Registrations allowed per minute under one runner name: strict, so that one runner
    /// registering in a loop does not crowd out the others.
    pub max_registrations_per_name: usize,
    /// How long a name registered with the registration token stays reserved if its runner
    /// never opens its work stream (ms).
    pub free_unconnected_after_ms: i64,
}

/// A role as the `sessions` table names it.
fn role_word(caller: &Caller) -> &'static str {
    match caller {
        Caller::Admin => "admin",
        _ => "viewer",
    }
}

/// The sessions of the web page in the database, less those that ended or whose token is not
/// `admin` or `viewer` any more (a token rotated, a new admin token made): those are deleted
/// (when `writing`; a standby only leaves them out).
async fn load_sessions<S: Store>(
    store: &S,
    admin: &TokenHash,
    viewer: &TokenHash,
    writing: bool,
) -> Result<HashMap<String, Session>> {
    let now = pipeline_core::clock::now_ms();
    let mut live = HashMap::new();
    for record in store.sessions().await? {
        let caller = match (record.role.as_str(), record.token_sha256.as_str()) {
            ("admin", t) if admin.is(t) => Caller::Admin,
            ("viewer", t) if viewer.is(t) => Caller::Viewer,
            _ => {
                if writing {
                    store
                        .end_sessions(EndSessions::One(&record.id_sha256))
                        .await?;
                }
                continue;
            }
        };
        if record.expires_at < now {
            if writing {
                store
                    .end_sessions(EndSessions::One(&record.id_sha256))
                    .await?;
            }
            continue;
        }
        live.insert(
            record.id_sha256,
            Session {
                caller,
                token: record.token_sha256,
                expires_at: record.expires_at,
            },
        );
    }
    Ok(live)
}

/// Drops the instants of `recent` older than the window.
fn prune(recent: &mut VecDeque<Instant>, now: Instant) {
    while recent
        .front()
        .is_some_and(|t| now.duration_since(*t) > WINDOW)
    {
        recent.pop_front();
    }
}

/// How a source address is counted: an IPv4 address (also one mapped into IPv6) alone, an
/// IPv6 address by its /64 (a host usually has the whole prefix).
pub fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("address:{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("address:{v4}"),
            None => {
                let s = v6.segments();
                format!("address:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

impl Auth {
    /// Loads (creating on first start) the tokens in `state_dir` and the runner credentials'
    /// hashes from the store.
    pub async fn open<S: Store>(
        store: &S,
        state_dir: &Path,
        max_registrations_per_minute: usize,
    ) -> Result<Self> {
        Self::open_as(store, state_dir, max_registrations_per_minute, true, false).await
    }

    /// As [`Auth::open`], for a standby (issue 28) when not `writing`: it reads the database
    /// and writes nothing to it. In a `group` (several servers on one PostgreSQL database) the
    /// tokens are the group's, held in the database: see [`token_hash`].
    pub async fn open_as<S: Store>(
        store: &S,
        state_dir: &Path,
        max_registrations_per_minute: usize,
        writing: bool,
        group: bool,
    ) -> Result<Self> {
        let admin_file = state_dir.join(ADMIN_FILE);
        let viewer_file = state_dir.join(VIEWER_FILE);
        let registration_file = state_dir.join(REGISTRATION_FILE);
        let tokens = Tokens { writing, group };
        let admin = tokens
            .hash(store, &admin_file, "pla_", "admin_token_sha256")
            .await?;
        let viewer = tokens
            .hash(store, &viewer_file, "plv_", "viewer_token_sha256")
            .await?;
        let sessions = load_sessions(store, &admin, &viewer, writing).await?;
        let registration = tokens
            .hash(
                store,
                &registration_file,
                "plr_",
                "registration_token_sha256",
            )
            .await?;
        let mut runners = HashMap::new();
        for (key, value) in store.list_meta(RUNNER_KEY).await? {
            if let Some(name) = key.strip_prefix(RUNNER_KEY) {
                runners.insert(value, name.to_owned());
            }
        }
        let revoked = store
            .list_meta(REVOKED_KEY)
            .await?
            .into_iter()
            .filter_map(|(key, _)| key.strip_prefix(REVOKED_KEY).map(str::to_owned))
            .collect();
        let mut unconnected = HashMap::new();
        for (key, value) in store.list_meta(UNCONNECTED_KEY).await? {
            if let (Some(name), Ok(at)) = (key.strip_prefix(UNCONNECTED_KEY), value.parse()) {
                unconnected.insert(name.to_owned(), at);
            }
        }
        let unconnected_by_age = unconnected
            .iter()
            .map(|(name, at)| (*at, name.clone()))
            .collect();
        Ok(Self {
            state: RwLock::new(State {
                admin,
                viewer,
                registration,
                sessions,
                runners,
                revoked,
                unconnected,
                unconnected_by_age,
                registrations: HashMap::new(),
                sweep_at: 1024,
            }),
            admin_file,
            viewer_file,
            registration_file,
            max_registrations_per_minute: max_registrations_per_minute.max(1),
            max_registrations_per_address: DEFAULT_REGISTRATIONS_PER_ADDRESS,
            max_registrations_per_name: DEFAULT_REGISTRATIONS_PER_NAME,
            free_unconnected_after_ms: FREE_UNCONNECTED_AFTER_MS,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this server's token files are its own only (in a group whose tokens are another
    /// server's, the first of the database): they work against this server alone.
    pub fn has_tokens_of_its_own(&self) -> bool {
        let state = self.read();
        [&state.admin, &state.viewer, &state.registration]
            .iter()
            .any(|t| t.own != t.group)
    }

    /// Who holds `token`, if anyone.
    pub fn identify(&self, token: &str) -> Option<Caller> {
        self.identify_hash(&hash(token))
    }

    /// [`Auth::identify`] for a token already hashed with [`hash`] (a stream checks its
    /// credential on every message without hashing it again).
    pub fn identify_hash(&self, h: &str) -> Option<Caller> {
        let state = self.read();
        if state.admin.is(h) {
            Some(Caller::Admin)
        } else if state.viewer.is(h) {
            Some(Caller::Viewer)
        } else if state.registration.is(h) {
            Some(Caller::Registration)
        } else {
            state
                .runners
                .get(h)
                .map(|name| Caller::Runner(name.clone()))
        }
    }

    /// Counts a registration by `caller` (a credential); refuses past the per-minute limit.
    pub fn count_registration(&self, caller: &str) -> Result<()> {
        let limit = self.max_registrations_per_minute;
        self.count(&[(caller.to_owned(), limit)], |_| {
            format!("more than {limit} registrations a minute from one credential; wait a minute")
        })
    }

    /// Counts a registration from `peer` (when known) under runner `name`; refuses past the
    /// per-address or the per-name limit, counting nothing then. Checked before the
    /// credential's count, so a host or a name over its limit does not use up the allowance of
    /// the credential the whole fleet shares.
    pub fn count_registration_source(
        &self,
        peer: Option<IpAddr>,
        name: &str,
        own_credential: bool,
    ) -> Result<()> {
        let (per_address, per_name) = (
            self.max_registrations_per_address.max(1),
            self.max_registrations_per_name.max(1),
        );
        // A name's registrations with its own credential are counted apart from those with
        // the shared token: attempts to take a name over cannot lock its runner out.
        let by = if own_credential { "own" } else { "shared" };
        let mut keys = vec![(format!("name:{name}:{by}"), per_name)];
        if let Some(ip) = peer {
            keys.push((address_key(ip), per_address));
        }
        self.count(&keys, |i| match (i, peer) {
            (0, _) => format!(
                "more than {per_name} registrations a minute of runner {name}; wait a minute"
            ),
            (_, Some(ip)) => {
                format!("more than {per_address} registrations a minute from {ip}; wait a minute")
            }
            (_, None) => "too many registrations; wait a minute".to_owned(),
        })
    }

    /// Counts one registration under every key of `keys` (each with its limit a minute) if
    /// none is at its limit; otherwise refuses with `refusal(index of the full key)`.
    fn count(&self, keys: &[(String, usize)], refusal: impl Fn(usize) -> String) -> Result<()> {
        let now = Instant::now();
        let mut state = self.write();
        if state.registrations.len() > state.sweep_at {
            state.registrations.retain(|_, recent| {
                prune(recent, now);
                !recent.is_empty()
            });
            state.sweep_at = (state.registrations.len() * 2).max(1024);
        }
        for (i, (key, limit)) in keys.iter().enumerate() {
            if let Some(recent) = state.registrations.get_mut(key) {
                prune(recent, now);
                if recent.len() >= *limit {
                    return Err(Error::ResourceExhausted(refusal(i)));
                }
            }
        }
        for (key, _) in keys {
            state
                .registrations
                .entry(key.clone())
                .or_default()
                .push_back(now);
        }
        Ok(())
    }

    /// Issues `name` a credential of its own (replacing any earlier one) at `now` (ms since
    /// the epoch); returns it. The name stays reserved for it; until its runner opens its work
    /// stream ([`Auth::connected`]), only for [`Auth::free_unconnected_after_ms`].
    pub async fn issue<S: Store>(&self, store: &S, name: &str, now: i64) -> Result<String> {
        let token = new_token("plc_")?;
        let h = hash(&token);
        store
            .put_meta(&format!("{UNCONNECTED_KEY}{name}"), &now.to_string())
            .await?;
        store.put_meta(&format!("{RUNNER_KEY}{name}"), &h).await?;
        let mut state = self.write();
        state.runners.retain(|_, n| n != name);
        state.runners.insert(h, name.to_owned());
        state.unconnect(name, Some(now));
        Ok(token)
    }

    /// Runner `name` opened its work stream: its name is no longer freed for want of it (a
    /// database write the first time only).
    pub async fn connected<S: Store>(&self, store: &S, name: &str) -> Result<()> {
        if !self.read().unconnected.contains_key(name) {
            return Ok(());
        }
        store
            .delete_meta(&format!("{UNCONNECTED_KEY}{name}"))
            .await?;
        self.write().unconnect(name, None);
        Ok(())
    }

    /// Frees the names whose credentials were issued at least
    /// [`Auth::free_unconnected_after_ms`] before `now` and never opened a work stream: the
    /// credential stops working and the registration token may register the name again.
    /// Returns them. Only the names due are looked at.
    pub async fn free_unconnected<S: Store>(&self, store: &S, now: i64) -> Result<Vec<String>> {
        let due: Vec<String> = {
            let state = self.read();
            let until = now.saturating_sub(self.free_unconnected_after_ms);
            state
                .unconnected_by_age
                .iter()
                .take_while(|(at, _)| *at <= until)
                .map(|(_, name)| name.clone())
                .collect()
        };
        for name in &due {
            store.delete_meta(&format!("{RUNNER_KEY}{name}")).await?;
            store
                .delete_meta(&format!("{UNCONNECTED_KEY}{name}"))
                .await?;
            let mut state = self.write();
            state.runners.retain(|_, n| n != name);
            state.unconnect(name, None);
        }
        Ok(due)
    }

    /// Whether a live credential holds the runner name `name` (then only that credential may
    /// register under it).
    pub fn name_taken(&self, name: &str) -> bool {
        self.read().runners.values().any(|n| n == name)
    }

    /// Whether `name` was revoked (and not forgotten since).
    pub fn is_revoked(&self, name: &str) -> bool {
        self.read().revoked.contains(name)
    }

    /// The names of revoked runners (until forgotten: their names stay reserved).
    pub fn revoked(&self) -> Vec<String> {
        self.read().revoked.iter().cloned().collect()
    }

    /// Cuts `name` off: its credential stops working, and the name cannot be registered again
    /// with the registration token until it is forgotten; `entry` is the feed's, written with
    /// the revocation. False if it had no credential.
    pub async fn revoke<S: Store>(
        &self,
        store: &S,
        name: &str,
        entry: &crate::feed::NewEntry,
    ) -> Result<bool> {
        store
            .set_meta_recording(&format!("{REVOKED_KEY}{name}"), Some("revoked"), entry)
            .await?;
        store.delete_meta(&format!("{RUNNER_KEY}{name}")).await?;
        store
            .delete_meta(&format!("{UNCONNECTED_KEY}{name}"))
            .await?;
        let mut state = self.write();
        state.unconnect(name, None);
        state.revoked.insert(name.to_owned());
        let before = state.runners.len();
        state.runners.retain(|_, n| n != name);
        Ok(state.runners.len() < before)
    }

    /// Whether `name` is known here: revoked, or holding a credential.
    pub fn knows(&self, name: &str) -> bool {
        let state = self.read();
        state.revoked.contains(name) || state.runners.values().any(|n| n == name)
    }

    /// Frees the name `name`: no credential holds it and it is not revoked any more; `entry`
    /// is the feed's, written with the revocation's end. True if there was anything to forget.
    pub async fn forget<S: Store>(
        &self,
        store: &S,
        name: &str,
        entry: &crate::feed::NewEntry,
    ) -> Result<bool> {
        store
            .set_meta_recording(&format!("{REVOKED_KEY}{name}"), None, entry)
            .await?;
        store.delete_meta(&format!("{RUNNER_KEY}{name}")).await?;
        store
            .delete_meta(&format!("{UNCONNECTED_KEY}{name}"))
            .await?;
        let mut state = self.write();
        state.unconnect(name, None);
        let had = state.revoked.remove(name);
        let before = state.runners.len();
        state.runners.retain(|_, n| n != name);
        Ok(had || state.runners.len() < before)
    }

    /// Replaces the viewer token (file and hash) and ends the sessions the old one opened;
    /// returns the new one and how many sessions ended. The database first, then the file and
    /// memory: a crash in between leaves the old token working and its sessions ended, and the
    /// rotation can be asked again.
    pub async fn rotate_viewer<S: Store>(&self, store: &S) -> Result<(String, u64)> {
        let token = new_token("plv_")?;
        let old = self.read().viewer.clone();
        let mut ended = store.end_sessions(EndSessions::OfToken(&old.group)).await?;
        if old.own != old.group {
            ended += store.end_sessions(EndSessions::OfToken(&old.own)).await?;
        }
        store.put_meta("viewer_token_sha256", &hash(&token)).await?;
        write_secret(&self.viewer_file, &token)?;
        let mut state = self.write();
        state.viewer = TokenHash::one(hash(&token));
        state.sessions.retain(|_, s| !old.is(&s.token));
        Ok((token, ended))
    }

    /// Opens a session of the web page for the holder of `token` (the admin or the viewer
    /// token; anything else is `Unauthenticated`): stored, then kept in memory. Returns the
    /// session's ID (for the cookie), who it is, and its end.
    pub async fn open_session<S: Store>(
        &self,
        store: &S,
        token: &str,
        now: i64,
    ) -> Result<(String, Caller, i64)> {
        let token_hash = hash(token);
        let caller = match self.identify_hash(&token_hash) {
            Some(c @ (Caller::Admin | Caller::Viewer)) => c,
            _ => {
                return Err(Error::Unauthenticated(
                    "that is not the admin or the viewer token (the files admin.token and \
                     viewer.token in the server's state dir hold them)"
                        .into(),
                ));
            }
        };
        // Sessions that ended are swept as new ones open (not on a timer).
        store.end_sessions(EndSessions::ExpiredBefore(now)).await?;
        let id = new_token("pls_")?;
        let ttl = i64::try_from(SESSION_TTL.as_millis()).unwrap_or(i64::MAX);
        let expires_at = now.saturating_add(ttl);
        let record = SessionRecord {
            id_sha256: hash(&id),
            role: role_word(&caller).to_owned(),
            token_sha256: token_hash.clone(),
            created_at: now,
            expires_at,
        };
        store.put_session(&record).await?;
        let mut state = self.write();
        state.sessions.retain(|_, s| s.expires_at >= now);
        state.sessions.insert(
            record.id_sha256,
            Session {
                caller: caller.clone(),
                token: token_hash,
                expires_at,
            },
        );
        Ok((id, caller, expires_at))
    }

    /// Who a session ID stands for, while it lasts and its token is current.
    pub fn session(&self, id: &str, now: i64) -> Option<Caller> {
        let state = self.read();
        let s = state.sessions.get(&hash(id))?;
        let current = match s.caller {
            Caller::Admin => state.admin.is(&s.token),
            Caller::Viewer => state.viewer.is(&s.token),
            _ => false,
        };
        (current && s.expires_at >= now).then(|| s.caller.clone())
    }

    /// Ends the session `id` (`POST /logout`): in the database, then in memory.
    pub async fn end_session<S: Store>(&self, store: &S, id: &str) -> Result<()> {
        let h = hash(id);
        store.end_sessions(EndSessions::One(&h)).await?;
        self.write().sessions.remove(&h);
        Ok(())
    }

    /// Replaces the registration token (file and hash); returns the new one.
    pub async fn rotate_registration<S: Store>(&self, store: &S) -> Result<String> {
        let token = new_token("plr_")?;
        write_secret(&self.registration_file, &token)?;
        store
            .put_meta("registration_token_sha256", &hash(&token))
            .await?;
        self.write().registration = TokenHash::one(hash(&token));
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_prefixed_and_hashes_are_hex() {
        let a = new_token("pla_").expect("token");
        let b = new_token("pla_").expect("token");
        assert_ne!(a, b);
        assert!(a.starts_with("pla_") && a.len() == 4 + 64);
        assert_eq!(hash(&a).len(), 64);
        assert_eq!(hash(&a), hash(&a));
        assert_ne!(hash(&a), hash(&b));
        // Lowercase hex SHA-256, as stored by earlier versions.
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    async fn auth() -> (Auth, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("dir");
        let store = crate::store::sqlite::SqliteStore::open(&format!(
            "sqlite://{}",
            dir.path().join("db").display()
        ))
        .await
        .expect("store");
        let auth = Auth::open(&store, dir.path(), 100).await.expect("auth");
        (auth, dir)
    }

    #[tokio::test]
    async fn registrations_are_limited_per_address_and_per_name_independently() {
        let (mut auth, _dir) = auth().await;
        auth.max_registrations_per_address = 3;
        auth.max_registrations_per_name = 2;
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        // One name, twice: then that name is refused, from anywhere...
        auth.count_registration_source(Some(a), "r", true)
            .expect("1");
        auth.count_registration_source(Some(a), "r", true)
            .expect("2");
        let err = auth
            .count_registration_source(Some(b), "r", true)
            .expect_err("name");
        assert!(err.to_string().contains("of runner r"), "{err}");
        // ...but the refusal counted nothing: the address has room for one more name.
        auth.count_registration_source(Some(a), "s", true)
            .expect("3");
        let err = auth
            .count_registration_source(Some(a), "t", true)
            .expect_err("address");
        assert!(err.to_string().contains("from 10.0.0.1"), "{err}");
        auth.count_registration_source(Some(b), "t", true)
            .expect("another host");
        auth.count_registration_source(None, "u", true)
            .expect("no address known");
        // Attempts at a name with the shared token do not use up its own runner's count.
        auth.count_registration_source(None, "v", false).expect("4");
        auth.count_registration_source(None, "v", false).expect("5");
        auth.count_registration_source(None, "v", false)
            .expect_err("the shared token's attempts at v");
        auth.count_registration_source(None, "v", true)
            .expect("v with its own credential");
    }

    #[tokio::test]
    async fn names_whose_runners_never_connect_are_freed_after_the_time_set() {
        let dir = tempfile::tempdir().expect("dir");
        let url = format!("sqlite://{}", dir.path().join("db").display());
        let store = crate::store::sqlite::SqliteStore::open(&url)
            .await
            .expect("store");
        let mut auth = Auth::open(&store, dir.path(), 100).await.expect("auth");
        auth.free_unconnected_after_ms = 1_000;
        let ghost = auth.issue(&store, "ghost", 10_000).await.expect("ghost");
        let live = auth.issue(&store, "live", 10_000).await.expect("live");
        let late = auth.issue(&store, "late", 10_500).await.expect("late");
        auth.connected(&store, "live")
            .await
            .expect("live connected");
        assert!(
            auth.free_unconnected(&store, 10_999)
                .await
                .expect("sweep")
                .is_empty()
        );
        assert_eq!(
            auth.free_unconnected(&store, 11_000).await.expect("sweep"),
            ["ghost"]
        );
        assert!(!auth.name_taken("ghost") && auth.identify(&ghost).is_none());
        assert!(auth.name_taken("live") && auth.name_taken("late"));
        // As the database has it: a server started again frees the same, and keeps the rest.
        let mut again = Auth::open(&store, dir.path(), 100).await.expect("reopen");
        again.free_unconnected_after_ms = 1_000;
        assert!(!again.name_taken("ghost"));
        assert_eq!(again.identify(&live), Some(Caller::Runner("live".into())));
        assert_eq!(
            again
                .free_unconnected(&store, 1_000_000)
                .await
                .expect("sweep"),
            ["late"]
        );
        assert!(again.identify(&late).is_none());
        assert_eq!(again.identify(&live), Some(Caller::Runner("live".into())));
        store.close().await;
    }

    #[test]
    fn an_ipv6_host_is_counted_by_its_prefix() {
        let key = |s: &str| address_key(s.parse().expect("ip"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.1"), key("192.0.2.1"));
        assert_ne!(key("192.0.2.1"), key("192.0.2.2"));
    }

    #[test]
    fn secrets_are_written_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("t");
        let token = load_or_create(&path, "plr_").expect("create");
        assert_eq!(load_or_create(&path, "plr_").expect("again"), token);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
