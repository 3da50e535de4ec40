//! The note that tells a `pipelinectl` on this host where the admin token is, so that the local
//! quick start needs no `--token`: `~/.local/state/pipeline/servers/<ip>-<port>` (the exact
//! listening address; `pipelinectl` offers the token only to that loopback address) holds the
//! token file's path, never the token.
//!
//! A note lives as long as its server: it is removed when the server stops, however it stops
//! that lets it (a graceful stop, a start-up that fails after it, a second signal), and a
//! server that could not remove its own (SIGKILL, a power loss) leaves one that the next server
//! started from the same home removes: a note is stale once no server holds the lock on the
//! state dir it names (`server.lock` beside the token; the kernel drops it when the process
//! ends, however it ends), or the server that holds it listens on another address (the lock
//! file says which). `pipelinectl` ignores such a note too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The note this process published (its path and content), for [`withdraw`].
static PUBLISHED: Mutex<Option<(PathBuf, String)>> = Mutex::new(None);

/// This server's note, removed when dropped (at the end of `app::run`).
#[derive(Debug)]
pub struct AdminNote {
    path: PathBuf,
    content: String,
}

impl Drop for AdminNote {
    fn drop(&mut self) {
        remove_if_ours(&self.path, &self.content);
        if let Ok(mut published) = PUBLISHED.lock() {
            *published = None;
        }
    }
}

/// Removes the note of this process now, if it published one: for a way out that runs no
/// destructor (`std::process::exit` on a second signal).
pub fn withdraw() {
    let published = PUBLISHED.lock().ok().and_then(|mut p| p.take());
    if let Some((path, content)) = published {
        remove_if_ours(&path, &content);
    }
}

/// Removes the note at `path` only if it is still the one written (not rewritten by a server
/// that took the address since).
fn remove_if_ours(path: &Path, content: &str) {
    if std::fs::read_to_string(path).is_ok_and(|c| c == content) {
        let _ = std::fs::remove_file(path);
    }
}

/// The file name of the note for a server listening on `addr` (`pipelinectl` reads the same
/// name): `127.0.0.1-50051`, `__1-50051` for `[::1]:50051`.
pub fn name(addr: SocketAddr) -> String {
    format!(
        "{}-{}",
        addr.ip().to_string().replace(':', "_"),
        addr.port()
    )
}

/// The directory of the notes, under `$HOME`.
fn dir() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".local/state/pipeline/servers"))
}

/// Writes the note for `addr` (after removing the stale notes of servers that are gone);
/// `None` if there is no home or it cannot be written (then `pipelinectl` needs `--token`).
pub fn publish(addr: SocketAddr, state_dir: &Path) -> Option<AdminNote> {
    let dir = dir()?;
    let own = name(addr);
    let removed = remove_stale(&dir, &own);
    if removed > 0 {
        tracing::debug!(removed, dir = %dir.display(), "removed the notes of servers that are gone");
    }
    let token = state_dir.join("admin.token");
    let content = token.canonicalize().unwrap_or(token).display().to_string();
    let path = dir.join(own);
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &content)) {
        Ok(()) => {
            if let Ok(mut published) = PUBLISHED.lock() {
                *published = Some((path.clone(), content.clone()));
            }
            Some(AdminNote { path, content })
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot note where the admin token is");
            None
        }
    }
}

/// Removes the notes in `dir` (but `own`, which this server is about to write) whose server is
/// gone; returns how many.
fn remove_stale(dir: &Path, own: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        if entry.file_name().to_str() == Some(own) {
            continue;
        }
        let path = entry.path();
        let Ok(content) = std::fs::read_to_string(&path) else {
            continue;
        };
        let note = entry.file_name().to_string_lossy().into_owned();
        if server_alive(Path::new(content.trim()), &note) {
            continue;
        }
        // Still the note just read (a server that took its address since writes a new one).
        if std::fs::read_to_string(&path).is_ok_and(|c| c == content)
            && std::fs::remove_file(&path).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// Whether the server noted as `note` (the note's file name), whose admin token is at
/// `token_file`, still runs: its token file exists, the lock on its state dir (`server.lock`
/// beside it) is held, and the holder listens on the note's address (or does not listen yet).
/// The lock is only tried, shared, and let go at once (`pipeline_core::lock::FileLock::take`
/// waits out such a moment). `pipelinectl` asks much the same before it offers a noted token.
fn server_alive(token_file: &Path, note: &str) -> bool {
    use std::io::Read;
    if !token_file.is_file() {
        return false;
    }
    let Some(lock) = token_file.parent().map(|d| d.join("server.lock")) else {
        return false;
    };
    let mut file = match std::fs::File::open(&lock) {
        Ok(file) => file,
        // A server from before the lock: keep the note.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return true,
        Err(_) => return false,
    };
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            return false;
        }
        Err(std::fs::TryLockError::WouldBlock) => {}
        // Cannot be told: keep the note.
        Err(std::fs::TryLockError::Error(_)) => return true,
    }
    // "pid N, address A": the holder, and where it listens once it does.
    let mut holder = String::new();
    let _ = file.read_to_string(&mut holder);
    match holder.split("address ").nth(1) {
        Some(addr) => addr
            .trim()
            .parse::<SocketAddr>()
            .is_ok_and(|addr| name(addr) == note),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_named_by_the_exact_address() {
        let name = |a: &str| name(a.parse().expect("addr"));
        assert_eq!(name("127.0.0.1:50051"), "127.0.0.1-50051");
        assert_eq!(name("[::1]:7"), "__1-7");
        assert_eq!(name("0.0.0.0:7"), "0.0.0.0-7");
    }

    #[test]
    fn only_the_notes_of_servers_that_are_gone_are_removed() {
        let tmp = tempfile::tempdir().expect("dir");
        let notes = tmp.path().join("notes");
        std::fs::create_dir(&notes).expect("mkdir");
        let state = |name: &str| {
            let dir = tmp.path().join(name);
            std::fs::create_dir(&dir).expect("mkdir");
            std::fs::write(dir.join("admin.token"), "pla_x").expect("token");
            std::fs::File::create(dir.join("server.lock")).expect("lock file")
        };
        let note = |name: &str, state: &str| {
            let token = tmp.path().join(state).join("admin.token");
            std::fs::write(notes.join(name), token.display().to_string()).expect("note");
        };
        // A live server holds its lock and says where it listens (one starting says nothing
        // yet); a killed one left its lock file unlocked; a deleted state dir left nothing.
        let mut live = state("live");
        live.lock().expect("lock");
        std::io::Write::write_all(&mut live, b"pid 7, address 127.0.0.1:1").expect("holder");
        let starting = state("starting");
        starting.lock().expect("lock");
        let _dead = state("dead");
        note("127.0.0.1-1", "live");
        note("127.0.0.1-5", "live");
        note("127.0.0.1-6", "starting");
        note("127.0.0.1-2", "dead");
        note("127.0.0.1-3", "deleted");
        note("127.0.0.1-4", "dead");
        assert_eq!(remove_stale(&notes, "127.0.0.1-4"), 3);
        let mut left: Vec<String> = std::fs::read_dir(&notes)
            .expect("notes")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["127.0.0.1-1", "127.0.0.1-4", "127.0.0.1-6"],
            "the live one at its address, the starting one, and our own"
        );
    }
}
