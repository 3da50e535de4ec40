//! An exclusive lock on a file beside what it guards, held for the process's life (the kernel
//! drops it when the process ends, however it ends), whose content names the holder: `pid N`,
//! and whatever the holder adds (the server its address). The server holds one for its state
//! dir and one for its database, a runner one for its work dir: a second process on the same
//! one is refused, told who holds it.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// A lock taken.
#[derive(Debug)]
pub struct FileLock {
    file: std::fs::File,
    pid: u32,
}

/// Why a lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it; what its file says of the holder (`pid 1234, …`), one line,
    /// maybe empty.
    #[error("held by another process ({0})")]
    Held(String),
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl FileLock {
    /// Takes the lock on `path` (creating the file), and notes this process's PID in it. A lock
    /// held is waited for only a moment ([`PATIENCE`]): whoever checks whether the holder is
    /// alive (`pipelinectl`, a server looking for stale notes) holds it shared for an instant,
    /// which must not turn the taker away; a process that holds it keeps it.
    pub fn take(path: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        match try_lock_patiently(&file) {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(LockError::Held(
                    holder.split_whitespace().collect::<Vec<_>>().join(" "),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut lock = Self {
            file,
            pid: std::process::id(),
        };
        lock.note("");
        Ok(lock)
    }

    /// Rewrites the note: `pid N`, then `more` after a comma when it is not empty.
    pub fn note(&mut self, more: &str) {
        let _ = self.file.set_len(0);
        let _ = self.file.rewind();
        let _ = match more {
            "" => write!(self.file, "pid {}", self.pid),
            more => write!(self.file, "pid {}, {more}", self.pid),
        };
    }
}

/// How long a lock held is waited for before it counts as held.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_millis(250);

/// Takes the exclusive lock on `file`, trying again for [`PATIENCE`] while it is held.
fn try_lock_patiently(file: &std::fs::File) -> Result<(), std::fs::TryLockError> {
    let start = std::time::Instant::now();
    loop {
        match file.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < PATIENCE => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_taker_is_refused_and_told_who_holds_it() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("x.lock");
        let mut first = FileLock::take(&path).expect("first");
        first.note("address 127.0.0.1:7");
        match FileLock::take(&path) {
            Err(LockError::Held(holder)) => assert_eq!(
                holder,
                format!("pid {}, address 127.0.0.1:7", std::process::id())
            ),
            other => panic!("{other:?}"),
        }
        drop(first);
        FileLock::take(&path).expect("free again");
    }
}
