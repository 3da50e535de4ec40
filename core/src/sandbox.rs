//! What an agent or a build may touch. Every agent and build runs under a [`Policy`]: the trees
//! it may read (and execute from) and the trees it may also write, enforced by the kernel's
//! Landlock in the [`guard`](crate::guard) that starts it, before the program runs. Anything
//! not granted is out of reach, whoever the process runs as (root too): the server's state dir
//! and tokens, the runner's credential and work dir, the other slots' worktrees.
//!
//! A policy is made from [`Rules`]: grants (read, write) and denials. A denied path inside a
//! granted tree is carved out of it (the tree is granted entry by entry around it), while a
//! grant inside a denied path stands: "the work dir is out of reach, but for this slot's
//! worktree". Landlock also keeps a sandboxed process from tracing or reading the memory of
//! processes outside its sandbox (so `/proc/<runner pid>/environ` is unreadable), and from
//! ABI 6 on from signalling them or reaching their abstract Unix sockets.
//!
//! What it does not cover (SECURITY.md): the network, Unix sockets by path (Landlock ABI < 9),
//! CPU, memory, disk and process counts, and what the world may read of any process
//! (`/proc/<pid>/cmdline`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which sandbox agents and builds run in, as `status --json` and `runners --json` say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The kernel's Landlock (read and write limited to the policy).
    Landlock,
    /// A separate unprivileged user: only what that user may read (named by the contract;
    /// not offered yet, see SECURITY.md).
    User,
    /// None (`--no-sandbox`): agents and builds can read and write what this process can.
    Off,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Landlock => "landlock",
            Kind::User => "user",
            Kind::Off => "off",
        }
    }

    /// The word on the wire (and in JSON); anything else is `None`.
    pub fn parse(word: &str) -> Option<Self> {
        match word {
            "landlock" => Some(Kind::Landlock),
            "user" => Some(Kind::User),
            "off" => Some(Kind::Off),
            _ => None,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a tree may be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Read files, list directories, execute.
    Read,
    /// All of reading, plus create, write, truncate, rename and remove beneath it.
    Write,
}

/// The trees a sandboxed process may reach: canonical paths, none of them holding a denied
/// path (see [`Rules::policy`]). Sent to the guard, which applies it to itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub rules: Vec<(PathBuf, Access)>,
}

/// Grants and denials, before they are resolved into a [`Policy`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    read: Vec<PathBuf>,
    write: Vec<PathBuf>,
    deny: Vec<PathBuf>,
    /// Read grants that yield to every denial (see [`Rules::named_in`]).
    named: Vec<PathBuf>,
}

impl Rules {
    /// Lets the process read (and execute from) `path` and everything beneath it.
    pub fn read(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.read.push(path.into());
        self
    }

    /// Lets the process read and write `path` and everything beneath it.
    pub fn write(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.write.push(path.into());
        self
    }

    /// Keeps `path` out of every grant that holds it (a grant at or beneath it stands).
    pub fn deny(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.deny.push(path.into());
        self
    }

    /// Lets the process read the files and directories an operator's command line names by
    /// absolute path (`--agent-cmd '/opt/agents/run.sh'`: the script), each alone, and none
    /// that is denied or lies beneath a denied path.
    pub fn named_in(&mut self, command: &str) -> &mut Self {
        let words = shell_words::split(command).unwrap_or_default();
        self.named.extend(
            words
                .iter()
                .map(PathBuf::from)
                .filter(|p| p.is_absolute() && p.exists()),
        );
        self
    }

    /// [`Rules::named_in`] each of `commands` (a verifier's: `Verifier::commands`).
    pub fn named_in_all<'a>(&mut self, commands: impl IntoIterator<Item = &'a str>) -> &mut Self {
        for command in commands {
            self.named_in(command);
        }
        self
    }

    /// These rules and `more`'s.
    pub fn merged(&self, more: &Rules) -> Rules {
        let mut all = self.clone();
        all.read.extend(more.read.iter().cloned());
        all.write.extend(more.write.iter().cloned());
        all.deny.extend(more.deny.iter().cloned());
        all.named.extend(more.named.iter().cloned());
        all
    }

    /// Resolves the rules: every path canonical (symbolic links followed; paths that do not
    /// exist are left out), and each grant that holds a denied path replaced by its entries,
    /// recursively, all but the denied one. Reads the directories it splits.
    pub fn policy(&self) -> Policy {
        let deny: Vec<PathBuf> = self.deny.iter().filter_map(|p| canonical(p)).collect();
        let mut rules: Vec<(PathBuf, Access)> = Vec::new();
        for (paths, access) in [(&self.write, Access::Write), (&self.read, Access::Read)] {
            for path in paths {
                if let Some(path) = canonical(path) {
                    carve(&path, &deny, &mut |p| rules.push((p, access)));
                }
            }
        }
        for path in self.named.iter().filter_map(|p| canonical(p)) {
            if !deny
                .iter()
                .any(|d| path.starts_with(d) || d.starts_with(&path))
            {
                rules.push((path, Access::Read));
            }
        }
        // A tree granted twice keeps its widest access (writes were pushed first).
        let mut seen = std::collections::HashSet::new();
        rules.retain(|(p, _)| seen.insert(p.clone()));
        Policy { rules }
    }
}

/// The absolute path with symbolic links resolved, if it exists.
fn canonical(path: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(path).ok()
}

/// Hands `grant` to `out`, or, when a denied path lies strictly beneath it, its entries one by
/// one (recursing into those that hold a denied path, skipping the denied ones). Symbolic links
/// among the entries are left out: Landlock judges an access by where the link leads, so a
/// link was never a way into its target, and the target has its own grants or none.
fn carve(grant: &Path, deny: &[PathBuf], out: &mut impl FnMut(PathBuf)) {
    let holds_denied = deny.iter().any(|d| d != grant && d.starts_with(grant));
    if !holds_denied {
        out(grant.to_path_buf());
        return;
    }
    let Ok(entries) = std::fs::read_dir(grant) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if deny.contains(&path) || entry.file_type().is_ok_and(|t| t.is_symlink()) {
            continue;
        }
        carve(&path, deny, out);
    }
}

/// Files of `/etc` that hold secrets, kept out of the default grant of `/etc` (their mode
/// already keeps other users out, but not a process of the same user, or root's).
const ETC_SECRETS: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/security/opasswd",
    "/etc/ssl/private",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/credstore",
    "/etc/credstore.encrypted",
];

/// Toolchain managers' directories under the home directory: their programs, libraries and
/// caches are read (never written: a build that could write there could change what this
/// process runs).
const HOME_TOOLCHAINS: &[&str] = &[
    ".cargo",
    ".rustup",
    ".pyenv",
    ".rbenv",
    ".nvm",
    ".volta",
    ".bun",
    ".deno",
    ".sdkman",
    ".asdf",
    ".local/share/mise",
    ".local/bin",
    ".local/lib",
    "go",
    ".gitconfig",
    ".config/git",
];

/// What every agent and build may read, on top of its own grants: the system's programs,
/// libraries and configuration, the devices and the kernel's views a build expects (`/proc`
/// but for its processes' directories, which hold every process's environment and command
/// line), each directory of `path` (where the programs it runs come from) and the toolchains
/// under `home`. Writes: the harmless devices and `/dev/shm` (shared by every process of the
/// machine).
pub fn default_rules(path: &str, home: Option<&Path>) -> Rules {
    let mut rules = Rules::default();
    for dir in [
        "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/nix",
        "/sys", "/dev",
    ] {
        rules.read(dir);
    }
    // `/proc` entry by entry: its numbered directories (and `self`, a link to one) are the
    // processes', where a process of the same user may read another's environment.
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let numbered = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
            if !numbered && !entry.file_type().is_ok_and(|t| t.is_symlink()) {
                rules.read(entry.path());
            }
        }
    }
    for secret in ETC_SECRETS {
        rules.deny(secret);
    }
    // The host keys of sshd (not the public halves, nor ssh's own configuration).
    if let Ok(entries) = std::fs::read_dir("/etc/ssh") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("ssh_host_") && !name.ends_with(".pub") {
                rules.deny(entry.path());
            }
        }
    }
    // Name resolution: /etc/resolv.conf often points under /run.
    rules.read("/run/systemd/resolve");
    for dir in std::env::split_paths(path) {
        if dir.is_absolute() {
            rules.read(dir);
        }
    }
    if let Some(home) = home {
        for dir in HOME_TOOLCHAINS {
            rules.read(home.join(dir));
        }
    }
    // Git's own configuration, where XDG puts it (git fails on one it cannot read).
    if let Some(config) = std::env::var_os("XDG_CONFIG_HOME") {
        rules.read(PathBuf::from(config).join("git"));
    }
    for dev in [
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/random",
        "/dev/urandom",
        "/dev/tty",
        "/dev/shm",
    ] {
        rules.write(dev);
    }
    rules
}

/// The sandbox a process runs its agents and builds in, chosen once at start-up.
#[derive(Clone, Debug)]
pub struct Sandbox {
    kind: Kind,
    /// What every sandboxed process may reach, and what none may.
    base: Rules,
    /// The kernel's Landlock ABI, when Landlock is in use.
    abi: Option<i32>,
}

impl Sandbox {
    /// Landlock when the kernel has it; none when `off` (`--no-sandbox`); a kernel without
    /// Landlock is refused, saying what to do.
    pub fn choose(off: bool, base: Rules) -> Result<Self, String> {
        if off {
            return Ok(Self {
                kind: Kind::Off,
                base,
                abi: None,
            });
        }
        match landlock_abi() {
            Some(abi) => Ok(Self {
                kind: Kind::Landlock,
                base,
                abi: Some(abi),
            }),
            None => Err(
                "this kernel has no Landlock (Linux 5.13 or later, with landlock in the lsm= \
                 boot list), so agents and builds cannot be sandboxed; pass --no-sandbox to run \
                 them unconfined (they can then read this process's credentials and files)"
                    .to_owned(),
            ),
        }
    }

    /// No sandbox (for tests of the layers above).
    pub fn off() -> Self {
        Self {
            kind: Kind::Off,
            base: Rules::default(),
            abi: None,
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The kernel's Landlock ABI version, when Landlock is in use.
    pub fn abi(&self) -> Option<i32> {
        self.abi
    }

    /// The policy of a process that may also reach `own` (its worktree, its temp dir…);
    /// `None` when there is no sandbox.
    pub fn policy(&self, own: &Rules) -> Option<Policy> {
        match self.kind {
            Kind::Off => None,
            Kind::Landlock | Kind::User => Some(self.base.merged(own).policy()),
        }
    }
}

/// The Landlock ABI this kernel offers, found by restricting a throwaway thread (the rest of
/// the process is untouched); `None` where Landlock is missing or disabled.
pub fn landlock_abi() -> Option<i32> {
    use landlock::{ABI, Access as _, AccessFs, LandlockStatus, Ruleset, RulesetAttr};
    std::thread::spawn(|| {
        let status = Ruleset::default()
            .handle_access(AccessFs::from_all(ABI::V1))
            .ok()?
            .create()
            .ok()?
            .restrict_self()
            .ok()?;
        match status.landlock {
            LandlockStatus::Available {
                effective_abi,
                kernel_abi,
            } => Some(kernel_abi.unwrap_or(effective_abi as i32)),
            _ => None,
        }
    })
    .join()
    .ok()
    .flatten()
}

impl Policy {
    /// Confines the calling thread, and every process it starts from now on, to the policy
    /// (Landlock). Fails unless the kernel enforced it.
    pub fn apply(&self) -> Result<(), String> {
        use landlock::{
            ABI, Access as _, AccessFs, CompatLevel, Compatible, RulesetAttr, RulesetCreatedAttr,
            RulesetStatus, Scope, path_beneath_rules,
        };
        // The newest ABI tested here (7); an older kernel enforces what it knows.
        let abi = ABI::V7;
        let fail = |e: landlock::RulesetError| format!("cannot set up the Landlock sandbox: {e}");
        let mut ruleset = landlock::Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(abi))
            .map_err(fail)?
            .scope(Scope::from_all(abi))
            .map_err(fail)?
            .create()
            .map_err(fail)?;
        for (path, access) in &self.rules {
            let rights = match access {
                Access::Read => AccessFs::from_read(abi),
                Access::Write => AccessFs::from_all(abi),
            };
            ruleset = ruleset
                .add_rules(path_beneath_rules([path], rights))
                .map_err(fail)?;
        }
        let status = ruleset.restrict_self().map_err(fail)?;
        if status.ruleset == RulesetStatus::NotEnforced {
            return Err("the kernel did not enforce the Landlock sandbox".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("dir");
        for d in ["a/secret", "a/open", "a/deep/er"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("mkdir");
        }
        std::fs::write(dir.path().join("a/file"), "x").expect("write");
        dir
    }

    fn paths(policy: &Policy, root: &Path) -> Vec<(String, Access)> {
        let mut all: Vec<(String, Access)> = policy
            .rules
            .iter()
            .map(|(p, a)| {
                (
                    p.strip_prefix(root)
                        .map_or_else(|_| p.display().to_string(), |p| p.display().to_string()),
                    *a,
                )
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    #[test]
    fn a_denied_path_is_carved_out_of_the_grant_that_holds_it() {
        let dir = tree();
        let root = dir.path().canonicalize().expect("canonical");
        let mut rules = Rules::default();
        rules
            .read(root.join("a"))
            .deny(root.join("a/secret"))
            .deny(root.join("a/deep/er"));
        assert_eq!(
            paths(&rules.policy(), &root),
            [
                ("a/file".to_owned(), Access::Read),
                ("a/open".to_owned(), Access::Read)
            ],
            "a/deep holds only a denied entry, so nothing of it is granted"
        );
    }

    #[test]
    fn a_grant_inside_a_denied_path_stands_and_writes_win() {
        let dir = tree();
        let root = dir.path().canonicalize().expect("canonical");
        let mut rules = Rules::default();
        rules
            .deny(root.join("a"))
            .write(root.join("a/open"))
            .read(root.join("a/open"))
            .read(root.join("missing"));
        assert_eq!(
            paths(&rules.policy(), &root),
            [("a/open".to_owned(), Access::Write)]
        );
    }

    #[test]
    fn links_are_not_split_into_grants_of_their_targets() {
        let dir = tree();
        let root = dir.path().canonicalize().expect("canonical");
        std::os::unix::fs::symlink(root.join("a/secret"), root.join("a/open/to-secret"))
            .expect("link");
        std::os::unix::fs::symlink(root.join("a/deep"), root.join("a/open/to-deep")).expect("link");
        std::fs::create_dir(root.join("a/open/x")).expect("mkdir");
        std::fs::write(root.join("a/open/y"), "y").expect("write");
        let mut rules = Rules::default();
        rules
            .read(root.join("a/open"))
            .deny(root.join("a/secret"))
            .deny(root.join("a/open/x"));
        assert_eq!(
            paths(&rules.policy(), &root),
            [("a/open/y".to_owned(), Access::Read)]
        );
    }

    #[test]
    fn paths_a_command_names_are_read_unless_denied() {
        let dir = tree();
        let root = dir.path().canonicalize().expect("canonical");
        let command = format!(
            "sh {} --x {} '{}' relative {}",
            root.join("a/file").display(),
            root.join("a/secret").display(),
            root.join("a/open").display(),
            root.join("missing").display()
        );
        let mut rules = Rules::default();
        rules.named_in(&command).deny(root.join("a/secret"));
        assert_eq!(
            paths(&rules.policy(), &root),
            [
                ("a/file".to_owned(), Access::Read),
                ("a/open".to_owned(), Access::Read)
            ]
        );
        let mut rules = Rules::default();
        rules
            .named_in(&root.join("a").display().to_string())
            .deny(root.join("a/secret"));
        assert!(
            rules.policy().rules.is_empty(),
            "a named path holding a denied one is not granted"
        );
    }

    #[test]
    fn kinds_have_the_contract_words() {
        for kind in [Kind::Landlock, Kind::User, Kind::Off] {
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(Kind::parse("none"), None);
    }
}
