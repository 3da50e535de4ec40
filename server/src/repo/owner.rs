//! Which database owns the repository. Two databases on one repository would each take the
//! other's landed records for their own (a task of one recorded Done from the other's landing,
//! its work never reaching the base), so the repository records its database's ID
//! (`<git dir>/pipeline-owner`, beside `pipeline.lock`, the lock one server holds on it), and
//! the database records its own (`database_id` in its meta). At start-up [`decide`] compares the
//! two: a database meets its own repository, or one that no database has claimed yet, and
//! claims it; a repository that belongs to another database is refused, unless the operator
//! says this database takes it over (`--accept-existing-history`, as for a lost database).
//!
//! The file lives in the git directory, so a clone (another repository) does not carry it, and
//! a restored backup of the database (the same ID) finds its repository as it left it.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The file in the repository's git directory that names the database owning it.
pub const OWNER_FILE: &str = "pipeline-owner";

/// The lock file in the repository's git directory that one server holds for its life.
pub const LOCK_FILE: &str = "pipeline.lock";

/// The key of the database's own ID in its meta.
pub const DATABASE_ID: &str = "database_id";

/// The repository's record of its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The owning database's ID.
    pub id: String,
    /// Where that database was (for the refusal's message), as its server last said.
    pub db: String,
}

/// What start-up does about the repository's owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// This database owns the repository.
    Owned,
    /// Record `id` as the repository's owner (and first as the database's own, when `new`).
    Claim { id: String, new: bool },
    /// Another database owns the repository.
    Refuse { owner: Owner },
}

/// Compares the database's ID (none: a new database, or one from before owners were kept)
/// with the repository's owner (none: never claimed). `take_over` claims a repository another
/// database owns; `fresh` makes a new ID.
pub fn decide(
    db_id: Option<&str>,
    owner: Option<&Owner>,
    take_over: bool,
    fresh: impl FnOnce() -> String,
) -> Decision {
    match (db_id, owner) {
        (Some(mine), Some(owner)) if mine == owner.id => Decision::Owned,
        (_, Some(owner)) if !take_over => Decision::Refuse {
            owner: owner.clone(),
        },
        (Some(mine), _) => Decision::Claim {
            id: mine.to_owned(),
            new: false,
        },
        (None, _) => Decision::Claim {
            id: fresh(),
            new: true,
        },
    }
}

/// The refusal of a repository that belongs to another database, in one line. An empty
/// database (`fresh`) is most likely the other one lost: said as the lost-database refusal.
pub fn refusal(repo: &Path, owner: &Owner, fresh: bool) -> Error {
    let whose = format!(
        "the repository {} belongs to another pipeline database ({}, id {})",
        repo.display(),
        owner.db,
        owner.id
    );
    Error::FailedPrecondition(if fresh {
        format!(
            "the database is empty but the repository shows an earlier pipeline: {whose}; if its \
             database was lost, restore it (or point --db at it), or pass \
             --accept-existing-history to start afresh beside that history (new task IDs then \
             continue after the highest one found)"
        )
    } else {
        format!(
            "{whose}: two databases on one repository would take each other's landings for \
             their own; start the server with that database (--state-dir, --db), or pass \
             --accept-existing-history to make this database the repository's"
        )
    })
}

fn path(common_dir: &Path) -> PathBuf {
    common_dir.join(OWNER_FILE)
}

/// The repository's owner, if it has one.
pub fn read(common_dir: &Path) -> Result<Option<Owner>> {
    let file = path(common_dir);
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Internal(format!(
                "cannot read {}: {e}",
                file.display()
            )));
        }
    };
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
    };
    match field("database ") {
        Some(id) if !id.is_empty() => Ok(Some(Owner {
            id,
            db: field("db ").unwrap_or_else(|| "unknown".to_owned()),
        })),
        _ => Err(Error::FailedPrecondition(format!(
            "{} does not name a database; remove it if no other pipeline server uses this \
             repository",
            file.display()
        ))),
    }
}

/// Records `owner` as the repository's (written whole, then renamed into place).
pub fn write(common_dir: &Path, owner: &Owner) -> Result<()> {
    let file = path(common_dir);
    let tmp = common_dir.join(format!("{OWNER_FILE}.tmp"));
    let text = format!(
        "# the pipeline database that owns this repository\ndatabase {}\ndb {}\n",
        owner.id, owner.db
    );
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &file))
        .map_err(|e| Error::Internal(format!("cannot write {}: {e}", file.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(id: &str) -> Owner {
        Owner {
            id: id.to_owned(),
            db: "sqlite:///x.db".to_owned(),
        }
    }

    #[test]
    fn a_repository_belongs_to_one_database() {
        let fresh = || "new".to_owned();
        let check = |db: Option<&str>, repo: Option<&str>, take: bool, want: Decision| {
            let o = repo.map(owner);
            assert_eq!(
                decide(db, o.as_ref(), take, fresh),
                want,
                "{db:?} {repo:?} {take}"
            );
        };
        let claim = |id: &str, new: bool| Decision::Claim {
            id: id.to_owned(),
            new,
        };
        let refuse = |id: &str| Decision::Refuse { owner: owner(id) };
        check(Some("a"), Some("a"), false, Decision::Owned);
        check(Some("a"), Some("a"), true, Decision::Owned);
        // Never claimed: the database claims it (a new one gets its ID first).
        check(Some("a"), None, false, claim("a", false));
        check(None, None, false, claim("new", true));
        // Another's: refused, unless taken over.
        check(Some("a"), Some("b"), false, refuse("b"));
        check(None, Some("b"), false, refuse("b"));
        check(Some("a"), Some("b"), true, claim("a", false));
        check(None, Some("b"), true, claim("new", true));
    }

    #[test]
    fn the_record_is_a_file_in_the_git_dir() {
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(read(dir.path()).expect("read"), None);
        write(dir.path(), &owner("abc")).expect("write");
        assert_eq!(read(dir.path()).expect("read"), Some(owner("abc")));
        std::fs::write(dir.path().join(OWNER_FILE), "garbage\n").expect("write");
        assert!(matches!(
            read(dir.path()),
            Err(Error::FailedPrecondition(_))
        ));
        for fresh in [false, true] {
            let line = refusal(Path::new("/r"), &owner("abc"), fresh).to_string();
            assert!(
                line.contains("belongs to another pipeline database"),
                "{line}"
            );
            assert!(line.contains("--accept-existing-history"), "{line}");
            assert!(!line.contains('\n'));
        }
    }
}
