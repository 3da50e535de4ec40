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
//! Where the kernel has no Landlock, or `--sandbox user` asks for it, the sandbox is a
//! separate unprivileged [`User`] instead: the guard hands the run's own trees
//! ([`Rules::own`]) to it and starts the program as it; the files' modes keep it out of the
//! rest (the runner and the server set theirs for that).
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
    /// A separate unprivileged user ([`User`]): only what that user may reach by the files'
    /// modes, and the process's own tree, handed to that user before it starts.
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
    /// Landlock's grants (empty, and not applied, under a separate user).
    pub rules: Vec<(PathBuf, Access)>,
    /// The process's own trees ([`Rules::own`]): under a separate user, handed to it (owner
    /// and group, recursively) before the program starts.
    #[serde(default)]
    pub owned: Vec<PathBuf>,
    /// The separate user the program runs as, instead of Landlock (`--sandbox user`).
    #[serde(default)]
    pub user: Option<User>,
}

/// Grants and denials, before they are resolved into a [`Policy`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    read: Vec<PathBuf>,
    write: Vec<PathBuf>,
    deny: Vec<PathBuf>,
    /// Read grants that yield to every denial (see [`Rules::named_in`]).
    named: Vec<PathBuf>,
    /// Write grants that are the process's own (see [`Rules::own`]).
    own: Vec<PathBuf>,
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

    /// Lets the process read and write `path` as its own: its worktree, its temp dir. Under a
    /// separate user ([`Kind::User`]) the tree is handed to that user before the process
    /// starts (a [`Rules::write`] grant is not: the user reaches it only if its modes allow).
    pub fn own(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.own.push(path.into());
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
        all.own.extend(more.own.iter().cloned());
        all
    }

    /// Resolves the rules: every path canonical (symbolic links followed; paths that do not
    /// exist are left out), and each grant that holds a denied path replaced by its entries,
    /// recursively, all but the denied one. Reads the directories it splits.
    pub fn policy(&self) -> Policy {
        let deny: Vec<PathBuf> = self.deny.iter().filter_map(|p| canonical(p)).collect();
        let mut rules: Vec<(PathBuf, Access)> = Vec::new();
        let owned: Vec<PathBuf> = self.own.iter().filter_map(|p| canonical(p)).collect();
        for (paths, access) in [
            (&self.own, Access::Write),
            (&self.write, Access::Write),
            (&self.read, Access::Read),
        ] {
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
        Policy {
            rules,
            owned,
            user: None,
        }
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

/// The user `--sandbox user` runs agents and builds as when `--sandbox-user` names none.
pub const DEFAULT_USER: &str = "pipeline-sandbox";

/// A separate unprivileged user agents and builds run as (`--sandbox user`): a local user of
/// `/etc/passwd`, never root. The guard switches to its uid and gid, with no supplementary
/// groups, before the program starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Its home directory (the program's `HOME`; it need not exist).
    pub home: PathBuf,
}

impl User {
    /// The local user `name` (`/etc/passwd`), refused when it is missing or root.
    pub fn lookup(name: &str) -> Result<Self, String> {
        let passwd = std::fs::read_to_string("/etc/passwd")
            .map_err(|e| format!("cannot read /etc/passwd to find the sandbox user: {e}"))?;
        let user = parse_passwd(&passwd, name).ok_or_else(|| {
            format!(
                "the sandbox user {name} does not exist: create it (useradd --system \
                 --no-create-home --shell /usr/sbin/nologin {name}) or name another with \
                 --sandbox-user"
            )
        })?;
        if user.uid == 0 || user.gid == 0 {
            return Err(format!(
                "the sandbox user {name} is root (uid or gid 0): name an unprivileged user with \
                 --sandbox-user"
            ));
        }
        Ok(user)
    }

    /// Whether this user may pass through `dir` and every directory above it (by the modes:
    /// others' or, for its group or as owner, the group's or owner's execute bit); the first
    /// one it may not is the error, saying what to do.
    pub fn can_reach(&self, dir: &Path) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        for d in dir.ancestors() {
            let Ok(meta) = std::fs::metadata(d) else {
                continue; // not there yet: made by this process, with its umask
            };
            let mode = meta.mode();
            let ok = if meta.uid() == self.uid {
                mode & 0o100 != 0
            } else if meta.gid() == self.gid {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !ok {
                return Err(format!(
                    "the sandbox user {} cannot reach {}: {} is mode {:o} (let others pass \
                     with chmod o+x, or choose a directory it can reach)",
                    self.name,
                    dir.display(),
                    d.display(),
                    mode & 0o7777
                ));
            }
        }
        Ok(())
    }
}

/// The user `name` of an `/etc/passwd` text.
fn parse_passwd(passwd: &str, name: &str) -> Option<User> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[0] != name {
            return None;
        }
        Some(User {
            name: name.to_owned(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: PathBuf::from(f[5]),
        })
    })
}

/// Whether this process may start programs as another user and hand it files: root, or the
/// capabilities CAP_CHOWN, CAP_SETGID and CAP_SETUID (effective).
pub fn can_switch_users() -> bool {
    const NEEDED: u64 = (1 << 0) | (1 << 6) | (1 << 7);
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let caps = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(caps.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & NEEDED == NEEDED)
}

/// The sandbox a process runs its agents and builds in, chosen once at start-up.
#[derive(Clone, Debug)]
pub struct Sandbox {
    kind: Kind,
    /// What every sandboxed process may reach, and what none may.
    base: Rules,
    /// The kernel's Landlock ABI, when Landlock is in use.
    abi: Option<i32>,
    /// The user agents and builds run as, under [`Kind::User`].
    user: Option<User>,
    /// Chosen because the kernel has no Landlock (no `--sandbox` given).
    fallback: bool,
}

const NO_LANDLOCK: &str = "this kernel has no Landlock (Linux 5.13 or later, with landlock in \
                           the lsm= boot list)";

impl Sandbox {
    /// The sandbox `wanted` (`--sandbox`), or by default Landlock when the kernel has it, else
    /// a separate user when this process can switch to one (`user`: `--sandbox-user`, else
    /// [`DEFAULT_USER`]); none only when asked for (`--no-sandbox`, `--sandbox off`). What
    /// cannot be had is refused, saying what to do.
    pub fn choose(wanted: Option<Kind>, user: Option<&str>, base: Rules) -> Result<Self, String> {
        let landlock = |abi| Self {
            kind: Kind::Landlock,
            base: base.clone(),
            abi: Some(abi),
            user: None,
            fallback: false,
        };
        let as_user = || -> Result<Self, String> {
            let name = user.unwrap_or(DEFAULT_USER);
            let user = User::lookup(name)?;
            if !can_switch_users() {
                return Err(format!(
                    "--sandbox user needs root (or the capabilities CAP_SETUID, CAP_SETGID and \
                     CAP_CHOWN) to run agents and builds as {name}"
                ));
            }
            Ok(Self {
                kind: Kind::User,
                base: base.clone(),
                abi: None,
                user: Some(user),
                fallback: false,
            })
        };
        match wanted {
            Some(Kind::Off) => Ok(Self {
                kind: Kind::Off,
                base,
                abi: None,
                user: None,
                fallback: false,
            }),
            Some(Kind::Landlock) => landlock_abi().map(landlock).ok_or_else(|| {
                format!(
                    "{NO_LANDLOCK}; run agents and builds as a separate user with --sandbox \
                     user, or unconfined with --no-sandbox"
                )
            }),
            Some(Kind::User) => as_user(),
            None => match landlock_abi() {
                Some(abi) => Ok(landlock(abi)),
                None => as_user()
                    .map(|s| Self {
                        fallback: true,
                        ..s
                    })
                    .map_err(|why| {
                        format!(
                            "{NO_LANDLOCK} and no separate user can be had ({why}); pass \
                             --no-sandbox to run agents and builds unconfined (they can then \
                             read this process's credentials and files)"
                        )
                    }),
            },
        }
    }

    /// No sandbox (for tests of the layers above).
    pub fn off() -> Self {
        Self {
            kind: Kind::Off,
            base: Rules::default(),
            abi: None,
            user: None,
            fallback: false,
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The kernel's Landlock ABI version, when Landlock is in use.
    pub fn abi(&self) -> Option<i32> {
        self.abi
    }

    /// The user agents and builds run as, under [`Kind::User`].
    pub fn user(&self) -> Option<&User> {
        self.user.as_ref()
    }

    /// What the start-up log says of the sandbox (a warning when there is none).
    pub fn describe(&self) -> String {
        match (self.kind, &self.user) {
            (Kind::Landlock, _) => format!(
                "sandboxed by Landlock (ABI {})",
                self.abi.unwrap_or_default()
            ),
            (Kind::User, Some(u)) => format!(
                "sandboxed as the user {} (uid {}, gid {}){}",
                u.name,
                u.uid,
                u.gid,
                if self.fallback {
                    ": this kernel has no Landlock, so the files' modes are the sandbox"
                } else {
                    ""
                }
            ),
            _ => "unconfined".to_owned(),
        }
    }

    /// The policy of a process that may also reach `own` (its worktree, its temp dir…);
    /// `None` when there is no sandbox. Under a separate user: that user, and the process's
    /// own trees ([`Rules::own`]) to hand it.
    pub fn policy(&self, own: &Rules) -> Option<Policy> {
        match (self.kind, &self.user) {
            (Kind::Landlock, _) => Some(self.base.merged(own).policy()),
            (Kind::User, Some(user)) => Some(Policy {
                rules: Vec::new(),
                owned: own.own.iter().filter_map(|p| canonical(p)).collect(),
                user: Some(user.clone()),
            }),
            _ => None,
        }
    }
}

/// The Landlock ABI this kernel offers, found by restricting a throwaway thread (the rest of
/// the process is untouched); `None` where Landlock is missing or disabled.
pub fn landlock_abi() -> Option<i32> {
    // The tests' stand-in for a kernel without Landlock.
    if crate::failpoint::armed("no-landlock") {
        return None;
    }
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
    /// The files an operator's command line names by absolute path (as [`Rules::named_in`]
    /// reads them) that this policy does not let the process read: under a Landlock policy,
    /// those beneath no grant. Empty under a separate user (file modes decide there) or when
    /// every one is readable.
    pub fn unreadable_in<'a>(&self, commands: impl IntoIterator<Item = &'a str>) -> Vec<PathBuf> {
        if self.user.is_some() {
            return Vec::new();
        }
        commands
            .into_iter()
            .flat_map(|c| shell_words::split(c).unwrap_or_default())
            .map(PathBuf::from)
            .filter(|p| p.is_absolute() && p.exists())
            .filter(|p| {
                canonical(p)
                    .is_none_or(|p| !self.rules.iter().any(|(grant, _)| p.starts_with(grant)))
            })
            .collect()
    }

    /// Hands the process's own trees ([`Policy::owned`]) to its separate user, if it has one:
    /// owner and group, recursively. The walk holds each directory open and never follows a
    /// link (a link swapped in while it walks is changed itself, not its target), and leaves a
    /// file with more than one link as it is (a hard link to a file outside the tree).
    pub fn hand_over(&self) -> Result<(), String> {
        let Some(user) = &self.user else {
            return Ok(());
        };
        let ids = (
            rustix::fs::Uid::from_raw(user.uid),
            rustix::fs::Gid::from_raw(user.gid),
        );
        for tree in &self.owned {
            chown_tree(rustix::fs::CWD, tree.as_path(), ids).map_err(|e| {
                format!(
                    "cannot hand {} to the sandbox user {}: {e}",
                    tree.display(),
                    user.name
                )
            })?;
        }
        Ok(())
    }

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

/// Changes the owner of `name` (in `dir`) and, for a directory, of all beneath it (see
/// [`Policy::hand_over`]).
fn chown_tree<P: rustix::path::Arg + Copy>(
    dir: impl std::os::fd::AsFd,
    name: P,
    (uid, gid): (rustix::fs::Uid, rustix::fs::Gid),
) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    use rustix::io::Errno;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(&dir, name, flags, Mode::empty()) {
        Ok(sub) => {
            rustix::fs::fchown(&sub, Some(uid), Some(gid))?;
            let mut entries = rustix::fs::Dir::read_from(&sub)?;
            while let Some(entry) = entries.read() {
                let entry = entry?;
                let child = entry.file_name();
                if child == c"." || child == c".." {
                    continue;
                }
                chown_tree(&sub, child, (uid, gid))?;
            }
            Ok(())
        }
        // Not a directory (a file, a link): itself, never what a link names.
        Err(Errno::NOTDIR | Errno::LOOP) => {
            let stat = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
            let is_dir = rustix::fs::FileType::from_raw_mode(stat.st_mode).is_dir();
            if stat.st_nlink > 1 && !is_dir {
                return Ok(());
            }
            rustix::fs::chownat(&dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?;
            Ok(())
        }
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command naming a script beneath no grant is told (a runner then gives the lease
    /// back before its agent runs); beneath a grant, or named by a relative path, it is not.
    #[test]
    fn a_command_naming_a_file_beneath_no_grant_is_told() {
        let dir = tree();
        let script = dir.path().join("a/open/build.sh");
        std::fs::write(&script, "true").expect("write");
        let cmd = format!("sh {} --fast", script.display());
        let mut rules = Rules::default();
        rules.read("/usr");
        assert_eq!(rules.policy().unreadable_in([cmd.as_str()]), vec![script]);
        assert!(
            rules
                .policy()
                .unreadable_in(["sh ./build.sh", "/usr/bin/env true"])
                .is_empty()
        );
        rules.read(dir.path().join("a/open"));
        assert!(rules.policy().unreadable_in([cmd.as_str()]).is_empty());
    }

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
    fn users_are_read_from_passwd_lines() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nbox:x:998:997::/nonexistent:/usr/sbin/nologin\nbad:x:y:1::/:/bin/sh\n";
        assert_eq!(
            parse_passwd(passwd, "box"),
            Some(User {
                name: "box".into(),
                uid: 998,
                gid: 997,
                home: PathBuf::from("/nonexistent"),
            })
        );
        assert_eq!(parse_passwd(passwd, "bo"), None);
        assert_eq!(parse_passwd(passwd, "bad"), None);
    }

    #[test]
    fn handing_a_tree_over_never_follows_a_link_nor_a_hard_linked_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tree();
        let root = dir.path().canonicalize().expect("canonical");
        let outside = tempfile::tempdir().expect("dir");
        std::fs::write(outside.path().join("secret"), "s").expect("write");
        std::os::unix::fs::symlink(outside.path(), root.join("a/open/link")).expect("link");
        std::fs::hard_link(outside.path().join("secret"), root.join("a/open/hard"))
            .expect("hard link");
        let me = std::fs::metadata(&root).expect("meta");
        // Handing it to this very user and group exercises the walk without privileges.
        let policy = Policy {
            rules: Vec::new(),
            owned: vec![root.join("a"), root.join("missing")],
            user: Some(User {
                name: "me".into(),
                uid: me.uid(),
                gid: me.gid(),
                home: PathBuf::from("/"),
            }),
        };
        policy.hand_over().expect("hand over");
        // As root, a real handover to another user: the link and the hard link stay as they are.
        if me.uid() == 0 {
            let other = Policy {
                user: Some(User {
                    name: "nobody".into(),
                    uid: 65534,
                    gid: 65534,
                    home: PathBuf::from("/"),
                }),
                ..policy
            };
            other.hand_over().expect("hand over");
            let uid = |p: &Path| std::fs::symlink_metadata(p).expect("meta").uid();
            assert_eq!(uid(&root.join("a/deep/er")), 65534);
            assert_eq!(uid(&root.join("a/file")), 65534);
            assert_eq!(uid(&root.join("a/open/link")), 65534, "the link itself");
            assert_eq!(uid(outside.path()), 0, "never what a link names");
            assert_eq!(
                uid(&outside.path().join("secret")),
                0,
                "nor a hard-linked file"
            );
        }
    }

    #[test]
    fn kinds_have_the_contract_words() {
        for kind in [Kind::Landlock, Kind::User, Kind::Off] {
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(Kind::parse("none"), None);
    }
}
