//! A real PostgreSQL that tests start themselves (feature `test-support`; a dev-dependency
//! only, never in a binary).
//!
//! [`PgServer::start`] runs `postgres` on a temp dir of its own under
//! `$TMPDIR/pipeline-pgtest/` (its cluster a copy of one `initdb` made once there for all test
//! processes, `template-…`), listening on no TCP port, only on a Unix socket in that dir (so
//! servers of parallel test processes never clash), with `fsync=off` unless asked (tests want
//! speed, not durability: the data is thrown away). As root, where `initdb` and `postgres`
//! refuse to run, both run as the `postgres` user (`setpriv`), the dir owned by it.
//! [`PgServer::shared`] is one server for the whole test process; [`PgServer::database`]
//! creates a fresh database on it for one test (`CREATE DATABASE`, a copy of `template1`:
//! milliseconds), dropped again when the test's [`PgDatabase`] is.
//!
//! No postgres outlives its test process: it runs with a parent-death signal (`SIGQUIT`,
//! PostgreSQL's immediate shutdown) tied to a thread that lives as long as the server's
//! handle (for the shared one, the process), so a test process that exits, panics or is
//! killed takes its server along; a dropped [`PgServer`] stops it and removes its dir; and
//! every start removes the dirs of test processes that are gone (stopping any server still
//! running there, which only a kernel without the signal would leave).
//!
//! The binaries are found on `PATH` (by `initdb`; the rest from the same directory, the
//! symlink followed), else in the newest `/usr/lib/postgresql/*/bin` (Debian's place). Without
//! them a start fails saying to install PostgreSQL (15 or newer).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections after `postgres` starts.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// What a server is started with.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Keep PostgreSQL's `fsync` on (a durable server, for a benchmark's floor); tests leave
    /// it off.
    pub fsync: bool,
}

/// A PostgreSQL server running on a temp dir, stopped and removed on drop.
#[derive(Debug)]
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    pid: u32,
    keeper: Option<std::thread::JoinHandle<()>>,
    next_db: AtomicU64,
    options: Options,
}

/// A database of its own on a [`PgServer`], for one test; dropped with it.
#[derive(Debug)]
pub struct PgDatabase<'a> {
    server: &'a PgServer,
    name: String,
    url: String,
}

impl PgDatabase<'_> {
    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its URL for sqlx (`postgres://postgres@localhost/NAME?host=SOCKET_DIR`).
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for PgDatabase<'_> {
    fn drop(&mut self) {
        // Best effort: the server's dir goes at the end anyway.
        let _ = self.server.psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
        );
    }
}

impl PgServer {
    /// The one server of this test process, started on first use. Panics, with the reason,
    /// when none can be started.
    pub fn shared() -> &'static PgServer {
        static SHARED: OnceLock<PgServer> = OnceLock::new();
        SHARED.get_or_init(|| match PgServer::start(Options::default()) {
            Ok(server) => server,
            Err(e) => panic!("{e}"),
        })
    }

    /// Starts a server of its own (see the module doc).
    pub fn start(options: Options) -> Result<PgServer, String> {
        let bin = bin_dir()?;
        let root = std::env::temp_dir().join("pipeline-pgtest");
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        // Shared by every user running tests (root's servers are the postgres user's).
        if is_root() {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o1777));
        }
        remove_leftovers(&root, &bin);
        static STARTED: AtomicU64 = AtomicU64::new(0);
        let dir = root.join(format!(
            "{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if is_root() {
            let (uid, gid) = postgres_user()?;
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| format!("cannot give {} to postgres: {e}", dir.display()))?;
        }
        let data = dir.join("data");
        if let Err(e) = copy_template(&root, &bin, &data) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let (pid, keeper) = spawn_postgres(&bin, &dir, options)?;
        let server = PgServer {
            dir,
            bin,
            pid,
            keeper: Some(keeper),
            next_db: AtomicU64::new(0),
            options,
        };
        server.wait_ready()?;
        Ok(server)
    }

    /// Waits until the server accepts connections, or fails with its log if it exits first.
    fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-q")
                .arg("-h")
                .arg(&self.dir)
                .args(["-U", "postgres"])
                .status()
                .map_err(|e| format!("cannot run pg_isready: {e}"))?;
            if ready.success() {
                return Ok(());
            }
            let log = std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
            if self.keeper.as_ref().is_none_or(|k| k.is_finished()) {
                return Err(format!("postgres exited at start:\n{log}"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "postgres did not accept connections within {START_DEADLINE:?}:\n{log}"
                ));
            }
            // Start-up only, bounded by the deadline; not a hot path.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server as `pg_ctl stop -m fast` does (`SIGINT`: every session ended, the data
    /// kept), for a test of what a database restart does to its clients; [`PgServer::start_again`]
    /// brings it back.
    pub fn shut_down(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
        // Gone: nothing to signal on drop (a PID of 0 is none).
        self.pid = 0;
    }

    /// Starts the server again on its data after [`PgServer::shut_down`], and waits until it
    /// accepts connections.
    pub fn start_again(&mut self) -> Result<(), String> {
        let (pid, keeper) = spawn_postgres(&self.bin, &self.dir, self.options)?;
        self.pid = pid;
        self.keeper = Some(keeper);
        self.wait_ready()
    }

    /// The directory of the server's Unix socket (and data, and log).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The URL of database `name` on this server, for sqlx.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://postgres@localhost/{name}?host={}",
            self.dir.display()
        )
    }

    /// A fresh, empty database for one test.
    pub fn database(&self) -> PgDatabase<'_> {
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            self.next_db.fetch_add(1, Ordering::Relaxed)
        );
        if let Err(e) = self.psql("postgres", &format!("CREATE DATABASE \"{name}\"")) {
            panic!("cannot create a test database: {e}");
        }
        PgDatabase {
            server: self,
            url: self.url(&name),
            name,
        }
    }

    /// Runs one SQL command with `psql` on database `db`.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(&self.dir)
            .args(["-U", "postgres", "-d", db, "-X", "-q", "-A", "-t"])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "{sql}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        stop(self.pid);
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Makes `data` a fresh cluster: a copy of the one `initdb` made once for these binaries
/// (`template-…` in `root`, made on first use: 1.5 s of `initdb` become 0.2 s of copying,
/// for every test process), made by this process if there is none yet.
fn copy_template(root: &Path, bin: &Path, data: &Path) -> Result<(), String> {
    let name: String = bin
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    // Per user too: root's is the postgres user's, which no one else may read.
    let uid = rustix::process::geteuid().as_raw();
    let template = root.join(format!("template-{uid}-{name}"));
    if !template.join("PG_VERSION").is_file() {
        // Made beside it under this process's name (removed as a leftover if it dies), then
        // renamed into place: of two processes at once, one rename wins, the other's copy goes.
        let fresh = root.join(format!("{}-template", std::process::id()));
        let _ = std::fs::remove_dir_all(&fresh);
        std::fs::create_dir(&fresh).map_err(|e| format!("{}: {e}", fresh.display()))?;
        if is_root() {
            let (uid, gid) = postgres_user()?;
            std::os::unix::fs::chown(&fresh, Some(uid), Some(gid))
                .map_err(|e| format!("cannot give {} to postgres: {e}", fresh.display()))?;
        }
        let out = as_postgres(&bin.join("initdb"), &fresh)
            .arg("-D")
            .arg(fresh.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "--no-instructions",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .map_err(|e| format!("cannot run initdb: {e}"))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&fresh);
            return Err(format!(
                "initdb failed in {}: {}",
                fresh.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        // Fails when another process's template is there already: this one goes.
        let _ = std::fs::rename(fresh.join("data"), &template);
        let _ = std::fs::remove_dir_all(&fresh);
    }
    // `cp -a` keeps the owner (postgres, as root) and the data dir's mode 0700.
    let out = Command::new("cp")
        .arg("-a")
        .arg(&template)
        .arg(data)
        .output()
        .map_err(|e| format!("cannot run cp: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot copy {} to {}: {}",
            template.display(),
            data.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Starts `postgres` on the data in `dir` (its log appended to `dir/postgres.log`), from a
/// keeper thread that waits on it: its PID and that thread.
fn spawn_postgres(
    bin: &Path,
    dir: &Path,
    options: Options,
) -> Result<(u32, std::thread::JoinHandle<()>), String> {
    let data = dir.join("data");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("postgres.log"))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut postgres = as_postgres(&bin.join("postgres"), dir);
    postgres
        .arg("-D")
        .arg(&data)
        .arg("-k")
        .arg(dir)
        .args(["-c", "listen_addresses=", "-c", "max_connections=300"])
        .args(["-c", "logging_collector=off"]);
    if !options.fsync {
        postgres.args(["-c", "fsync=off", "-c", "full_page_writes=off"]);
    }
    postgres
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    // The keeper thread spawns postgres and waits on it: the parent-death signal fires
    // when the thread that spawned the child ends, so it must live as long as the server.
    let (tx, rx) = std::sync::mpsc::channel();
    let keeper = std::thread::Builder::new()
        .name("pgtest-keeper".into())
        .spawn(move || match postgres.spawn() {
            Ok(mut child) => {
                let _ = tx.send(Ok(child.id()));
                let _ = child.wait();
            }
            Err(e) => {
                let _ = tx.send(Err(format!("cannot start postgres: {e}")));
            }
        })
        .map_err(|e| e.to_string())?;
    let pid = rx
        .recv()
        .map_err(|_| "the postgres keeper thread ended".to_owned())??;
    Ok((pid, keeper))
}

/// Stops a postmaster at once (`SIGQUIT`: immediate shutdown, its backends with it).
fn stop(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::QUIT);
    }
}

/// Removes the dirs of test processes that are gone, stopping a server still running there.
fn remove_leftovers(root: &Path, bin: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if owner == std::process::id() || Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let dir = entry.path();
        // postmaster.pid's first line is the postmaster's PID; pg_ctl confirms it is ours.
        if let Ok(text) = std::fs::read_to_string(dir.join("data/postmaster.pid"))
            && let Some(pid) = text
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<u32>().ok())
        {
            let running = Command::new(bin.join("pg_ctl"))
                .arg("status")
                .arg("-D")
                .arg(dir.join("data"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if running {
                stop(pid);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `program` run as the `postgres` user when this process is root (initdb and postgres refuse
/// root), from `dir` (a directory that user can enter).
fn as_postgres(program: &Path, dir: &Path) -> Command {
    let mut command = if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--pdeathsig=QUIT",
        ])
        .arg(program);
        c
    } else {
        let mut c = Command::new("setpriv");
        c.arg("--pdeathsig=QUIT").arg(program);
        c
    };
    command.current_dir(dir);
    command
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The `postgres` user's UID and GID.
fn postgres_user() -> Result<(u32, u32), String> {
    let id = |flag: &str| -> Result<u32, String> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| format!("cannot run id: {e}"))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| "running as root needs a `postgres` user to run PostgreSQL as (install the postgresql package)".to_owned())
    };
    Ok((id("-u")?, id("-g")?))
}

/// The directory of PostgreSQL's binaries: `initdb`'s on `PATH` (symlinks followed), else the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn bin_dir() -> Result<PathBuf, String> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("initdb"))
        .find(|f| f.is_file())
        .and_then(|f| f.canonicalize().ok())
        .and_then(|f| f.parent().map(Path::to_path_buf))
        .filter(|d| d.join("postgres").is_file() && d.join("pg_isready").is_file());
    if let Some(dir) = on_path {
        return Ok(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).ok_or_else(|| {
        "PostgreSQL not found (no initdb on PATH or in /usr/lib/postgresql/*/bin): install \
         PostgreSQL 15 or newer (Debian: apt-get install postgresql)"
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_runs_sql_in_a_database_of_its_own_and_is_gone_after_drop() {
        let server = PgServer::start(Options::default()).expect("a server");
        let dir = server.socket_dir().to_path_buf();
        let pid = server.pid;
        {
            let db = server.database();
            server
                .psql(
                    db.name(),
                    "CREATE TABLE t (x int); INSERT INTO t VALUES (41)",
                )
                .expect("create");
            assert_eq!(
                server
                    .psql(db.name(), "SELECT x + 1 FROM t")
                    .expect("select"),
                "42"
            );
            let other = server.database();
            assert!(
                server.psql(other.name(), "SELECT x FROM t").is_err(),
                "each test's database is empty"
            );
        }
        drop(server);
        assert!(!dir.exists(), "its dir is removed");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "its postmaster is gone"
        );
    }
}
