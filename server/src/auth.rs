//! Credentials and roles. Three kinds of token, each a random 256-bit value with a prefix that
//! says what it is: the admin token (`pla_…`, the control API), the runner registration token
//! (`plr_…`, good only to register), and a runner's own credential (`plc_…`, issued at
//! registration, good only for the runner API and only for that runner's leases).
//!
//! The admin and registration tokens live in files of mode 0600 in the state dir; the database
//! holds only SHA-256 hashes, and runner credentials exist nowhere but on their runner. Checking
//! a token is a hash and a map lookup in memory, in a gRPC interceptor.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::store::Store;

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Admin,
    /// The holder of the registration token: may only register.
    Registration,
    /// A registered runner, by name.
    Runner(String),
}

const ADMIN_FILE: &str = "admin.token";
const REGISTRATION_FILE: &str = "runner-registration.token";
const RUNNER_KEY: &str = "runner_credential:";

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

struct State {
    admin: String,
    registration: String,
    /// Credential hash → runner name.
    runners: HashMap<String, String>,
    /// Recent registrations per caller, for the rate limit.
    registrations: HashMap<String, VecDeque<Instant>>,
}

/// The server's credentials.
pub struct Auth {
    state: RwLock<State>,
    pub admin_file: PathBuf,
    pub registration_file: PathBuf,
    /// Registrations allowed per minute from one credential.
    pub max_registrations_per_minute: usize,
}

impl Auth {
    /// Loads (creating on first start) the tokens in `state_dir` and the runner credentials'
    /// hashes from the store.
    pub async fn open<S: Store>(
        store: &S,
        state_dir: &Path,
        max_registrations_per_minute: usize,
    ) -> Result<Self> {
        let admin_file = state_dir.join(ADMIN_FILE);
        let registration_file = state_dir.join(REGISTRATION_FILE);
        let admin = load_or_create(&admin_file, "pla_")?;
        let registration = load_or_create(&registration_file, "plr_")?;
        store.put_meta("admin_token_sha256", &hash(&admin)).await?;
        store
            .put_meta("registration_token_sha256", &hash(&registration))
            .await?;
        let mut runners = HashMap::new();
        for (key, value) in store.list_meta(RUNNER_KEY).await? {
            if let Some(name) = key.strip_prefix(RUNNER_KEY) {
                runners.insert(value, name.to_owned());
            }
        }
        Ok(Self {
            state: RwLock::new(State {
                admin: hash(&admin),
                registration: hash(&registration),
                runners,
                registrations: HashMap::new(),
            }),
            admin_file,
            registration_file,
            max_registrations_per_minute: max_registrations_per_minute.max(1),
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

    /// Who holds `token`, if anyone.
    pub fn identify(&self, token: &str) -> Option<Caller> {
        self.identify_hash(&hash(token))
    }

    /// [`Auth::identify`] for a token already hashed with [`hash`] (a stream checks its
    /// credential on every message without hashing it again).
    pub fn identify_hash(&self, h: &str) -> Option<Caller> {
        let state = self.read();
        if h == state.admin {
            Some(Caller::Admin)
        } else if h == state.registration {
            Some(Caller::Registration)
        } else {
            state
                .runners
                .get(h)
                .map(|name| Caller::Runner(name.clone()))
        }
    }

    /// Counts a registration by `caller`; refuses past the per-minute limit.
    pub fn count_registration(&self, caller: &str) -> Result<()> {
        let now = Instant::now();
        let mut state = self.write();
        let recent = state.registrations.entry(caller.to_owned()).or_default();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            recent.pop_front();
        }
        if recent.len() >= self.max_registrations_per_minute {
            return Err(Error::ResourceExhausted(format!(
                "more than {} registrations a minute from one credential; wait a minute",
                self.max_registrations_per_minute
            )));
        }
        recent.push_back(now);
        Ok(())
    }

    /// Issues `name` a credential of its own (replacing any earlier one); returns it.
    pub async fn issue<S: Store>(&self, store: &S, name: &str) -> Result<String> {
        let token = new_token("plc_")?;
        let h = hash(&token);
        store.put_meta(&format!("{RUNNER_KEY}{name}"), &h).await?;
        let mut state = self.write();
        state.runners.retain(|_, n| n != name);
        state.runners.insert(h, name.to_owned());
        Ok(token)
    }

    /// Cuts `name` off; false if it had no credential.
    pub async fn revoke<S: Store>(&self, store: &S, name: &str) -> Result<bool> {
        store.delete_meta(&format!("{RUNNER_KEY}{name}")).await?;
        let mut state = self.write();
        let before = state.runners.len();
        state.runners.retain(|_, n| n != name);
        Ok(state.runners.len() < before)
    }

    /// Replaces the registration token (file and hash); returns the new one.
    pub async fn rotate_registration<S: Store>(&self, store: &S) -> Result<String> {
        let token = new_token("plr_")?;
        write_secret(&self.registration_file, &token)?;
        store
            .put_meta("registration_token_sha256", &hash(&token))
            .await?;
        self.write().registration = hash(&token);
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
