//! A test repository's database, whichever backend its servers run on ([`crate::test_database`]):
//! SQLite's `pipeline.db` in the state dir, or its PostgreSQL database on the test process's
//! server. For the tests about what happens to the database behind the server's back (a copy
//! restored, the database lost, another process holding its write lock, rows made in bulk),
//! so that they run on both backends: each helper does the same thing to either.
//!
//! The SQLite side uses the `sqlite3` CLI; the PostgreSQL side `psql`, `pg_dump` and
//! `pg_restore` from PostgreSQL's binaries ([`pipeline_core::pgtest::bin_dir`]).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};

use pipeline_core::pgtest::{self, PgServer};

use crate::{TestRepo, pg_database};

/// A copy of a repository's database, taken while its server may be running
/// ([`TestRepo::snapshot_database`]).
pub struct DbSnapshot {
    path: PathBuf,
}

/// Another process holding a repository's database's write lock ([`TestRepo::hold_write_lock`]):
/// every write of a server on it waits until [`WriteLock::release`] (or drop).
pub struct WriteLock {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl WriteLock {
    /// Rolls the holder's transaction back and waits for it to end.
    pub fn release(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "ROLLBACK;");
            let _ = stdin.flush();
        }
        let _ = self.child.wait();
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
        }
        self.end();
    }
}

impl TestRepo {
    /// Whether this repository's servers run on PostgreSQL (`PIPELINE_TEST_DB=postgres` and
    /// not [`TestRepo::sqlite_only`]).
    pub fn on_postgres(&self) -> bool {
        pg_database(self).is_some()
    }

    fn sqlite_file(&self) -> PathBuf {
        self.state_dir().join("pipeline.db")
    }

    /// Runs `sql` (one or more statements) on this repository's database: with `sqlite3` on
    /// `pipeline.db`, or `psql` on its PostgreSQL database; returns what it printed, trimmed.
    /// The SQL is the caller's: write it for the backend [`TestRepo::on_postgres`] names.
    pub fn sql(&self, sql: &str) -> String {
        match pg_database(self) {
            Some((name, _)) => PgServer::shared()
                .psql(&name, sql)
                .unwrap_or_else(|e| panic!("psql: {e}")),
            None => {
                let out = Command::new("sqlite3")
                    .arg(self.sqlite_file())
                    .arg(sql)
                    .stdin(Stdio::null())
                    .output()
                    .expect("the sqlite3 CLI (apt install sqlite3)");
                assert!(
                    out.status.success(),
                    "sqlite3: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8_lossy(&out.stdout).trim().to_owned()
            }
        }
    }

    /// A consistent copy of the database as it is now, named `name` in the repository's temp
    /// dir; the server may be running (`sqlite3 .backup`, or `pg_dump`).
    pub fn snapshot_database(&self, name: &str) -> DbSnapshot {
        let path = self.dir.path().join(format!("snapshot-{name}"));
        match pg_database(self) {
            Some((db, _)) => pg_tool(
                pg_command("pg_dump")
                    .args(["--format=custom", "--file"])
                    .arg(&path)
                    .arg(db),
            ),
            None => {
                self.sql(&format!(".backup '{}'", path.display()));
            }
        }
        DbSnapshot { path }
    }

    /// Puts `snapshot` back as the database, all later changes gone (as after a restore from
    /// a backup, or a power loss that took the last writes). No server may be running on it.
    pub fn restore_database(&self, snapshot: &DbSnapshot) {
        self.lose_database();
        match pg_database(self) {
            Some((db, _)) => pg_tool(
                pg_command("pg_restore")
                    .args(["--exit-on-error", "--dbname"])
                    .arg(db)
                    .arg(&snapshot.path),
            ),
            None => {
                std::fs::copy(&snapshot.path, self.sqlite_file()).expect("restore the database");
            }
        }
    }

    /// Loses the database: SQLite's files are removed, the PostgreSQL database dropped and made
    /// again empty (its name, so its URL, the same). No server may be running on it.
    pub fn lose_database(&self) {
        match pg_database(self) {
            Some((db, _)) => {
                let server = PgServer::shared();
                server
                    .psql("postgres", &format!("DROP DATABASE \"{db}\" WITH (FORCE)"))
                    .unwrap_or_else(|e| panic!("{e}"));
                server
                    .psql("postgres", &format!("CREATE DATABASE \"{db}\""))
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            None => {
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = self.sqlite_file().into_os_string();
                    file.push(suffix);
                    let _ = std::fs::remove_file(file);
                }
            }
        }
    }

    /// Everything the database holds, as text, for a test that checks that nothing changed
    /// (`sqlite3 .dump`, or `pg_dump --data-only`: rows and sequences' positions).
    pub fn database_dump(&self) -> String {
        match pg_database(self) {
            Some((db, _)) => {
                let out = pg_command("pg_dump")
                    .args(["--data-only", "--no-comments"])
                    .arg(db)
                    .stdin(Stdio::null())
                    .output()
                    .expect("run pg_dump");
                assert!(
                    out.status.success(),
                    "pg_dump: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                // Less the random key of pg_dump's `\restrict` lines (new in 15.14).
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict "))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
            None => self.sql(".dump"),
        }
    }

    /// Another process (`sqlite3` or `psql`) takes the database's write lock and keeps it
    /// until the returned holder is released or dropped: SQLite's `BEGIN IMMEDIATE`; on
    /// PostgreSQL the feed's head row, which every state change locks first.
    pub fn hold_write_lock(&self) -> WriteLock {
        let (mut cmd, sql) = match pg_database(self) {
            Some((db, _)) => {
                let mut cmd = pg_command("psql");
                cmd.args(["-X", "-q", "-A", "-t", "-d"]).arg(db);
                (cmd, "BEGIN; SELECT 'locked' FROM feed_head FOR UPDATE;")
            }
            None => {
                let mut cmd = Command::new("sqlite3");
                cmd.arg(self.sqlite_file());
                (cmd, "BEGIN IMMEDIATE; SELECT 'locked';")
            }
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the database's CLI (sqlite3 or psql)");
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{sql}").expect("write");
        stdin.flush().expect("flush");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "locked", "the write lock was taken");
        WriteLock {
            child,
            stdin: Some(stdin),
        }
    }
}

/// One of PostgreSQL's client programs, connecting to the test process's server.
fn pg_command(name: &str) -> Command {
    let bin = pgtest::bin_dir().unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Command::new(bin.join(name));
    cmd.arg("-h")
        .arg(PgServer::shared().socket_dir())
        .args(["-U", "postgres"]);
    cmd
}

/// Runs a prepared `pg_dump` or `pg_restore`, panicking with its stderr on failure.
fn pg_tool(cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
