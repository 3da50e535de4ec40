//! Shell completions and man pages, generated from a binary's own clap definition, so they
//! never drift from the flags: `BINARY --generate-completions bash|zsh|fish` prints a
//! completion script, `BINARY --generate-man DIR` writes `BINARY.1` (and one page per
//! subcommand, `pipelinectl-task-add.1`, …) into `DIR`. Each of the three binaries checks for
//! these two flags before it parses its own command line (the server's `--repo` is required,
//! and these need nothing), so a packager runs the built binaries, nothing else.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
pub use clap_complete::Shell;

/// The two generator flags, alone on a command line.
#[derive(Debug, Parser)]
#[command(disable_help_flag = true, disable_version_flag = true)]
struct Generate {
    /// Print a completion script for this shell on stdout.
    #[arg(
        long,
        value_enum,
        value_name = "SHELL",
        conflicts_with = "generate_man"
    )]
    generate_completions: Option<Shell>,
    /// Write the man pages into this directory (made if missing).
    #[arg(long, value_name = "DIR")]
    generate_man: Option<PathBuf>,
}

/// What a command line asks to generate, if it is one of the generator flags and its value
/// (`--generate-completions SHELL`, `--generate-man DIR`) and nothing else.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Completions(Shell),
    Man(PathBuf),
}

impl Request {
    /// Reads `args` (with the program's name first); `None` when they are anything else, for
    /// the binary's own parser to read.
    pub fn from_args<I, T>(args: I) -> Option<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let g = Generate::try_parse_from(args).ok()?;
        match (g.generate_completions, g.generate_man) {
            (Some(shell), None) => Some(Self::Completions(shell)),
            (None, Some(dir)) => Some(Self::Man(dir)),
            _ => None,
        }
    }

    /// Generates what was asked for `C`'s command line: the script on `out`, or the pages in
    /// the directory (each path written is named on `out`, one a line).
    pub fn run<C: CommandFactory>(&self, out: &mut dyn Write) -> std::io::Result<()> {
        match self {
            Self::Completions(shell) => completions::<C>(*shell, out),
            Self::Man(dir) => {
                for page in man_pages::<C>(dir)? {
                    writeln!(out, "{}", page.display())?;
                }
                Ok(())
            }
        }
    }
}

/// For a binary's `main`, before it parses its command line: when this process's arguments
/// are a generator flag, generates for `C` and returns the exit status (failures said in one
/// line on stderr); otherwise `None`.
pub fn generate_if_asked<C: CommandFactory>() -> Option<std::process::ExitCode> {
    let request = Request::from_args(std::env::args_os())?;
    let name = C::command().get_name().to_owned();
    let result = request.run::<C>(&mut std::io::stdout().lock());
    Some(match (result, &request) {
        (Ok(()), _) => std::process::ExitCode::SUCCESS,
        (Err(e), Request::Man(dir)) => {
            eprintln!(
                "{name}: cannot write the man pages into {}: {e}",
                dir.display()
            );
            std::process::ExitCode::FAILURE
        }
        (Err(e), Request::Completions(_)) => {
            eprintln!("{name}: cannot write the completion script: {e}");
            std::process::ExitCode::FAILURE
        }
    })
}

/// Writes `C`'s completion script for `shell` to `out`.
pub fn completions<C: CommandFactory>(shell: Shell, out: &mut dyn Write) -> std::io::Result<()> {
    let mut cmd = C::command();
    let name = cmd.get_name().to_owned();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut buf);
    out.write_all(&buf)
}

/// Writes `C`'s man pages into `dir` (made if missing): the binary's page and one per visible
/// subcommand, at any depth. Returns the paths written.
pub fn man_pages<C: CommandFactory>(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = C::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write_pages(cmd, dir, &mut written)?;
    Ok(written)
}

fn write_pages(cmd: clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir, written)?;
    }
    written.push(clap_mangen::Man::new(cmd).generate_to(dir)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    #[command(name = "demo", version, about = "A demo.")]
    struct Demo {
        #[arg(long)]
        repo: PathBuf,
        #[command(subcommand)]
        cmd: Option<Sub>,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Sub {
        /// Tasks.
        Task {
            #[command(subcommand)]
            cmd: TaskSub,
        },
    }

    #[derive(Debug, clap::Subcommand)]
    enum TaskSub {
        /// Adds one.
        Add,
    }

    #[test]
    fn only_a_generator_flag_alone_is_a_request() {
        assert_eq!(
            Request::from_args(["demo", "--generate-completions", "bash"]),
            Some(Request::Completions(Shell::Bash))
        );
        assert_eq!(
            Request::from_args(["demo", "--generate-man", "out"]),
            Some(Request::Man(PathBuf::from("out")))
        );
        assert_eq!(Request::from_args(["demo", "--repo", "r"]), None);
        assert_eq!(Request::from_args(["demo"]), None);
        assert_eq!(
            Request::from_args(["demo", "--generate-man", "out", "--repo", "r"]),
            None
        );
        assert_eq!(
            Request::from_args(["demo", "--generate-completions", "tcsh"]),
            None
        );
    }

    #[test]
    fn pages_for_the_binary_and_every_subcommand() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("man1");
        let mut names: Vec<String> = man_pages::<Demo>(&out)
            .expect("pages")
            .iter()
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        assert_eq!(names, ["demo-task-add.1", "demo-task.1", "demo.1"]);
        let page = std::fs::read_to_string(out.join("demo.1")).expect("read");
        assert!(page.starts_with(".ie \\n(.g .ds Aq \\(aq"), "{page}");
        assert!(page.contains(".TH demo 1"), "{page}");
        assert!(page.contains("\\-\\-repo"), "{page}");
    }

    #[test]
    fn a_completion_script_names_the_subcommands() {
        let mut script = Vec::new();
        completions::<Demo>(Shell::Bash, &mut script).expect("script");
        let script = String::from_utf8(script).expect("utf-8");
        assert!(script.contains("complete -F _demo"), "{script}");
        assert!(script.contains("task"), "{script}");
    }
}
