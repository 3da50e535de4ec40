//! Validated identifiers. Every constructor checks its input, so a value of these types is safe
//! where it goes: a [`TaskId`] or [`RunnerName`] as a git ref component or a path, a
//! [`CommitId`] or [`TreeId`] on a git command line (a full hexadecimal object ID can never be
//! read as an option or a revision expression).

use std::fmt;

/// Why an identifier was refused: one line, naming the value and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(pub String);

/// Milliseconds since the Unix epoch (UTC), the protocol's and the database's time unit.
pub type Millis = i64;

/// Checks a name made of `[A-Za-z0-9][A-Za-z0-9._-]{0,63}` that is also a valid git ref
/// component (no `..`, not ending in `.` or `.lock`); `what` names it in the refusal.
fn check_name(raw: &str, what: &str) -> Result<(), InvalidId> {
    let refuse = |why: &str| {
        Err(InvalidId(format!(
            "invalid {what} {}: {why}",
            quote_for_message(raw)
        )))
    };
    if raw.is_empty() {
        return refuse("it is empty");
    }
    if raw.len() > 64 {
        return refuse(&format!(
            "it is {} characters long, the limit is 64",
            raw.len()
        ));
    }
    if !raw.as_bytes()[0].is_ascii_alphanumeric() {
        return refuse("it must start with a letter or a digit");
    }
    if let Some(bad) = raw
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return refuse(&format!(
            "{} is not allowed (use letters, digits, '.', '_' and '-')",
            quote_char(bad)
        ));
    }
    if raw.contains("..") {
        return refuse("it must not contain '..'");
    }
    if raw.ends_with('.') {
        return refuse("it must not end with '.'");
    }
    if raw.ends_with(".lock") {
        return refuse("it must not end with '.lock'");
    }
    Ok(())
}

/// The highest number a generated task ID (`t-<n>`) may have: the database's integer range, so
/// that no arithmetic on it can wrap.
pub const MAX_GENERATED: u64 = i64::MAX as u64;

/// A task identifier: `t-<n>` when generated; when given by a user it must match
/// `[A-Za-z0-9][A-Za-z0-9._-]{0,63}` and be a valid git ref component.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(String);

impl TaskId {
    /// Validates a user-given identifier; the error says what is wrong with it.
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        check_name(raw, "task id")?;
        Ok(Self(raw.to_owned()))
    }

    /// Validates an identifier a person chooses for a new task (`task add --id`): as
    /// [`TaskId::parse`], and `t-<n>`, the form of generated IDs, only as one of them exactly
    /// (`n` from 1 to [`MAX_GENERATED`], no leading zero, lowercase): `t-0`, `t-01` or `T-1`
    /// would name a generated task's refs and files under another spelling, and a number past
    /// the bound would leave the generator nowhere to go.
    pub fn parse_chosen(raw: &str) -> Result<Self, InvalidId> {
        let id = Self::parse(raw)?;
        let reserved = raw.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("t-"))
            && raw.len() > 2
            && raw[2..].bytes().all(|b| b.is_ascii_digit());
        if reserved && id.number().is_none() {
            return Err(InvalidId(format!(
                "invalid task id {}: t-<n> is the form of generated IDs; choose one of them \
                 exactly (n from 1 to {MAX_GENERATED}, no leading zero) or another name",
                quote_for_message(raw)
            )));
        }
        Ok(id)
    }

    /// The identifier generated for the `n`th task.
    pub fn generated(n: u64) -> Self {
        Self(format!("t-{n}"))
    }

    /// The `n` of a generated identifier `t-<n>`: only in its one spelling (no leading zero)
    /// and from 1 to [`MAX_GENERATED`]; `None` for anything else.
    pub fn number(&self) -> Option<u64> {
        let digits = self.0.strip_prefix("t-")?;
        if digits.is_empty()
            || digits.starts_with('0')
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        digits
            .parse()
            .ok()
            .filter(|n| (1..=MAX_GENERATED).contains(n))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A runner's name, chosen by its operator: like a task ID, safe in refs, paths and messages.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunnerName(String);

impl RunnerName {
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        check_name(raw, "runner name")?;
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunnerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The server's identifier of one registration of a runner (it changes when the runner
/// registers again). Opaque: printable, at most 100 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunnerId(String);

impl RunnerId {
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        if raw.is_empty() || raw.len() > 100 || !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidId(format!(
                "invalid runner id {}",
                quote_for_message(raw)
            )));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A lease as named on the wire: its ID and epoch. The pair fences: a message naming any
/// other lease of the task is refused.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseRef {
    pub id: String,
    pub epoch: u64,
}

impl LeaseRef {
    /// The lease of `task`'s `epoch`th lease.
    pub fn of(task: &TaskId, epoch: u64) -> Self {
        Self {
            id: format!("{task}@{epoch}"),
            epoch,
        }
    }

    /// Validates a lease named by a peer (an ID of at most 200 printable bytes).
    pub fn parse(id: String, epoch: u64) -> Result<Self, InvalidId> {
        if id.is_empty() || id.len() > 200 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidId("invalid lease id".to_owned()));
        }
        Ok(Self { id, epoch })
    }
}

/// A full hexadecimal git object ID (SHA-1 or SHA-256).
fn check_hex(raw: &str, what: &str) -> Result<(), InvalidId> {
    if (raw.len() == 40 || raw.len() == 64) && raw.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(InvalidId(format!(
            "{} is not a full {what} id",
            quote_for_message(raw)
        )))
    }
}

/// A commit, by its full object ID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommitId(String);

impl CommitId {
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        check_hex(raw, "commit")?;
        Ok(Self(raw.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tree, by its full object ID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TreeId(String);

impl TreeId {
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        check_hex(raw, "tree")?;
        Ok(Self(raw.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TreeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Quotes user input for an error message, escaping control characters and cutting it short.
pub fn quote_for_message(raw: &str) -> String {
    const LIMIT: usize = 80;
    let mut shown: String = raw.chars().take(LIMIT).collect::<String>();
    if raw.chars().count() > LIMIT {
        shown.push('…');
    }
    format!("{shown:?}")
}

fn quote_char(c: char) -> String {
    match c {
        ' ' => "a space".to_owned(),
        c if c.is_control() => format!("the control character {c:?}"),
        c => format!("{c:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_follow_the_contract() {
        for ok in ["t-1", "a", "A.b_c-d", "9lives", &"x".repeat(64), "v1.2"] {
            assert!(TaskId::parse(ok).is_ok(), "{ok} should be accepted");
        }
        for (bad, why) in [
            ("", "empty"),
            ("../x", "must start with a letter"),
            ("-x", "must start with a letter"),
            ("a b", "a space"),
            (&"x".repeat(80), "limit is 64"),
            ("a..b", "'..'"),
            ("a.", "end with '.'"),
            ("a.lock", "'.lock'"),
            ("a/b", "'/'"),
            ("a\0b", "control character"),
            ("é", "must start with a letter"),
            ("a~1", "'~'"),
        ] {
            let err = TaskId::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.starts_with("invalid task id"), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        assert_eq!(TaskId::generated(7).number(), Some(7));
        assert_eq!(TaskId::parse("fix-1").ok().and_then(|t| t.number()), None);
    }

    #[test]
    fn generated_numbers_have_one_spelling_and_a_bound() {
        let number = |raw: &str| TaskId::parse(raw).ok().and_then(|t| t.number());
        assert_eq!(number("t-9223372036854775807"), Some(MAX_GENERATED));
        for never in [
            "t-0",
            "t-01",
            "t-9223372036854775808",
            "t-18446744073709551615",
            "t-99999999999999999999",
            "T-1",
            "t-",
        ] {
            assert_eq!(number(never), None, "{never}");
        }
        for chosen in ["t-5", "t-9223372036854775807", "t-1a", "task-01", "t1"] {
            assert!(TaskId::parse_chosen(chosen).is_ok(), "{chosen}");
        }
        for alias in [
            "t-0",
            "t-01",
            "T-1",
            "t-18446744073709551615",
            "t-9223372036854775808",
        ] {
            let err = TaskId::parse_chosen(alias).expect_err(alias).to_string();
            assert!(err.contains("the form of generated IDs"), "{alias}: {err}");
        }
    }

    #[test]
    fn runner_names_and_ids_are_checked() {
        assert!(RunnerName::parse("build-7").is_ok());
        let err = RunnerName::parse("-x").expect_err("refused").to_string();
        assert!(err.starts_with("invalid runner name"), "{err}");
        assert!(RunnerId::parse("r1-123").is_ok());
        assert!(RunnerId::parse("").is_err());
        assert!(RunnerId::parse(&"x".repeat(101)).is_err());
        assert!(RunnerId::parse("a b").is_err());
    }

    #[test]
    fn object_ids_are_full_hex() {
        let sha = "a".repeat(40);
        assert_eq!(
            CommitId::parse(&sha).map(|c| c.to_string()),
            Ok(sha.clone())
        );
        assert_eq!(
            CommitId::parse(&"A".repeat(40)).map(|c| c.to_string()),
            Ok(sha),
            "lowercased"
        );
        assert!(CommitId::parse(&"b".repeat(64)).is_ok());
        for bad in ["HEAD", "--all", "abc", &"g".repeat(40), &"a".repeat(41)] {
            assert!(CommitId::parse(bad).is_err(), "{bad}");
            assert!(TreeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn leases_are_named_by_task_and_epoch() {
        let t = TaskId::parse("t-3").expect("id");
        assert_eq!(LeaseRef::of(&t, 2).id, "t-3@2");
        assert!(LeaseRef::parse(String::new(), 1).is_err());
        assert!(LeaseRef::parse("x".repeat(201), 1).is_err());
        assert!(LeaseRef::parse("t-3@2".into(), 2).is_ok());
    }
}
