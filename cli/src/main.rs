//! `pipelinectl`: see and steer a pipeline server. Human-readable tables by default, `--json`
//! for scripts; every failure is one line on stderr and a stable exit code (see [`Failure`]).
//!
//! `client.rs` makes the calls and answers in the view types of `model.rs`, which `wire.rs`
//! converts from the protocol's messages (the only module besides `client.rs` that names
//! them); `output.rs` prints view values to the writer it is given; `main` parses the command,
//! runs it and prints to stdout.

mod batch;
mod client;
mod failure;
mod output;

use pipeline_api::{model, time, wire};

use std::io::{self, Read, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::Client;
use crate::failure::{Failure, exit};
use crate::model::{NewTask, TaskChange, TaskStatus};
use crate::output::Format;

/// See and steer a pipeline: tasks, runners, status.
#[derive(Clone, Debug, Parser)]
#[command(name = "pipelinectl", version)]
struct Cli {
    /// The server's URL; several, separated by commas, for servers of which one leads (a
    /// command a standby refuses goes to the leader it names).
    #[arg(
        long,
        global = true,
        env = "PIPELINE_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,

    /// The CA to trust for the server's certificate (PEM), for an https:// server.
    #[arg(long, global = true, env = "PIPELINE_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,

    /// The admin token [env: PIPELINE_ADMIN_TOKEN, else PIPELINE_TOKEN; default: found in the
    /// local server's state dir].
    #[arg(
        long,
        global = true,
        env = "PIPELINE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,

    /// A file holding the admin token (it wins over --token).
    #[arg(long, global = true, env = "PIPELINE_ADMIN_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,

    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// The admin token given: `--token`, else `PIPELINE_ADMIN_TOKEN`, else `PIPELINE_TOKEN`
    /// (the one name `pipelinectl` and the runner shared before each had its own; the specific
    /// name wins when both are set).
    fn token(&self) -> Option<String> {
        self.token
            .clone()
            .or_else(|| std::env::var("PIPELINE_TOKEN").ok())
            .filter(|t| !t.trim().is_empty())
    }
}

#[derive(Clone, Debug, Subcommand)]
enum Command {
    /// Counts of tasks by status, active dev runs and runners.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Create, list, show, retry and cancel tasks.
    #[command(subcommand)]
    Task(TaskCommand),
    /// The runners known to the server.
    Runners {
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<RunnersAction>,
    },
    /// The merge train now, then the tasks waiting behind it in order; pause or resume it.
    Queue {
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<QueueAction>,
    },
    /// Credentials.
    #[command(subcommand)]
    Token(TokenCommand),
    /// A task's run logs, oldest run first, each under a header naming the run.
    Logs {
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// Stream new lines live; exit once the task is done, needs help or is cancelled. A
        /// server that goes away is waited for, and the stream resumes where it was.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only the last N lines (then, with --follow, the new ones).
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Only lines from this long ago on (e.g. 10m, 2h, 1d).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        since: Option<std::time::Duration>,
        /// Only the runs of this attempt (the number in the `=== dev · attempt N ===` headers).
        #[arg(long, value_name = "N")]
        run: Option<u32>,
        /// The agent's output as the runner received it (the JSON events of claude and codex),
        /// instead of the readable lines made of it.
        #[arg(long)]
        raw: bool,
    },
    /// Every task transition, live, one line each; with --all or --kind, the whole change feed
    /// (runners, landing, the queue, trains and tasks).
    Watch {
        #[arg(long)]
        json: bool,
        /// Every entry of the change feed, not only task transitions.
        #[arg(long, conflicts_with_all = ["task", "parent", "status"])]
        all: bool,
        /// Only the feed's entries of this topic (repeatable).
        #[arg(long, value_name = "K", value_parser = ["task", "runner", "landing", "queue", "train"],
              conflicts_with_all = ["task", "parent", "status"])]
        kind: Vec<String>,
        /// With --all or --kind: go on after this position of the feed (the `position` of
        /// the last entry seen), the entries since first.
        #[arg(long, value_name = "POS", value_parser = clap::value_parser!(i64).range(0..))]
        after: Option<i64>,
        /// Only this task's transitions.
        #[arg(long, allow_hyphen_values = true, conflicts_with = "parent")]
        task: Option<String>,
        /// Only the transitions of this epic's children (and of the epic itself).
        #[arg(long, allow_hyphen_values = true)]
        parent: Option<String>,
        /// Only transitions into this status.
        #[arg(long, value_parser = ["open", "in_progress", "verified", "done", "needs_help", "cancelled"])]
        status: Option<String>,
    },
    /// Why a task is where it is, in sentences.
    Explain {
        #[arg(allow_hyphen_values = true)]
        id: String,
    },
    /// Print a completion script for a shell (e.g. `pipelinectl completions bash >
    /// /etc/bash_completion.d/pipelinectl`); needs no server.
    Completions {
        #[arg(value_enum)]
        shell: pipeline_core::manual::Shell,
    },
}

#[derive(Clone, Debug, Subcommand)]
enum RunnersAction {
    /// Cut a runner off at once: its credential stops working, its leases go back to Open, and
    /// its name cannot be registered again until it is forgotten.
    Revoke {
        #[arg(allow_hyphen_values = true)]
        name: String,
    },
    /// Let a runner finish what it holds and take nothing new (as SIGTERM does, from here);
    /// it stays drained when it reconnects, until undrained.
    Drain {
        #[arg(allow_hyphen_values = true)]
        name: String,
    },
    /// Let a drained runner take work again.
    Undrain {
        #[arg(allow_hyphen_values = true)]
        name: String,
    },
    /// Remove a runner that is not connected from the list, freeing its name.
    Forget {
        #[arg(allow_hyphen_values = true)]
        name: String,
    },
}

#[derive(Clone, Debug, Subcommand)]
enum QueueAction {
    /// Stop new leases; running work goes on, and so does landing unless --landing. With
    /// --landing-only, hold landing alone.
    Pause {
        /// Why, for `status` and `queue` to show.
        #[arg(long)]
        reason: Option<String>,
        /// Hold the merge train too (the train in flight finishes first).
        #[arg(long, conflicts_with = "landing_only")]
        landing: bool,
        /// Hold only the merge train: agents keep working and tasks keep reaching verified,
        /// but nothing lands until `queue resume` (a closed tree).
        #[arg(long)]
        landing_only: bool,
    },
    /// Lift every pause: leases, landing, and a red base's hold on landing.
    Resume,
}

#[derive(Clone, Debug, Subcommand)]
enum TokenCommand {
    /// Replace the runner registration token (or, with --viewer, the read-only viewer token);
    /// prints the new one.
    Rotate {
        /// Replace the viewer token instead: the web page's sessions opened with the old one
        /// end.
        #[arg(long)]
        viewer: bool,
    },
}

#[derive(Clone, Debug, Subcommand)]
enum TaskCommand {
    /// Create a task; prints its ID alone on stdout. With --from-file, many tasks, one ID a line.
    Add {
        #[arg(long, required_unless_present = "from_file")]
        title: Option<String>,
        /// Create one task per line of this JSON-lines file (`-` for standard input); keys:
        /// title (required), description, namespace, priority, parent, depends_on, requires,
        /// max_cost, id, approval, epic.
        #[arg(long, conflicts_with_all = ["title", "description", "description_file", "namespace",
              "parent", "depends_on", "id", "requires", "max_cost", "approval", "epic"])]
        from_file: Option<String>,
        #[arg(long, conflicts_with = "description_file")]
        description: Option<String>,
        /// Read the description from a file (`-` for standard input).
        #[arg(long)]
        description_file: Option<String>,
        /// What `bild` verifies (e.g. `Omni/Pipeline.hs`); none skips verification.
        #[arg(long)]
        namespace: Option<String>,
        /// 0 (highest) to 4 (lowest).
        #[arg(long, default_value_t = 2)]
        priority: u32,
        #[arg(long, allow_hyphen_values = true)]
        parent: Option<String>,
        /// A task that must be done first; repeat for several.
        #[arg(long = "depends-on", allow_hyphen_values = true)]
        depends_on: Vec<String>,
        /// Choose the ID instead of the generated `t-<n>`.
        #[arg(long, allow_hyphen_values = true)]
        id: Option<String>,
        /// A label its runner must have (`KEY=VALUE`, or a bare `KEY` for any value); repeat
        /// for several.
        #[arg(
            long = "requires",
            value_name = "KEY[=VALUE]",
            allow_hyphen_values = true
        )]
        requires: Vec<String>,
        /// This task's cost cap in cents, over the server's --max-task-cost.
        #[arg(long, value_name = "CENTS", allow_hyphen_values = true)]
        max_cost: Option<f64>,
        /// Once verified, it waits for a person's approval before it lands (`task approve`).
        #[arg(long)]
        approval: bool,
        /// An epic from the start: never leased itself, done once its children (added later
        /// with --parent) are, so no agent starts on it while they are being added.
        #[arg(long)]
        epic: bool,
    },
    /// List tasks, highest priority and oldest first (printed page by page as they arrive).
    List {
        #[arg(long, value_parser = ["open", "in_progress", "verified", "done", "needs_help", "cancelled"])]
        status: Option<String>,
        /// Only the children of this task (an epic).
        #[arg(long, allow_hyphen_values = true)]
        parent: Option<String>,
        /// At most this many tasks.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// A task with its runs and history.
    Show {
        #[arg(allow_hyphen_values = true)]
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Back to Open with the failure count cleared (from needs_help, cancelled or open).
    Retry {
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// Guidance for the agent, added to the next prompt.
        #[arg(long)]
        note: Option<String>,
        /// Drop the previous patchset: the next attempt starts from the current base.
        #[arg(long)]
        fresh: bool,
    },
    /// Approve a verified task that waits for approval: it may land.
    Approve {
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// Why, for its history.
        #[arg(long)]
        note: Option<String>,
        /// Who approves, for its history [default: $USER].
        #[arg(long, value_name = "NAME")]
        by: Option<String>,
    },
    /// Reject a verified task: it goes back to its agent, which amends the commit with the
    /// note as feedback (a failed attempt).
    Reject {
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// What the agent should change (the next prompt has it).
        #[arg(long, required = true)]
        note: String,
        /// Who rejects, for its history [default: $USER].
        #[arg(long, value_name = "NAME")]
        by: Option<String>,
    },
    /// Cancel a task, stopping its agent if one is running.
    Cancel {
        #[arg(allow_hyphen_values = true)]
        id: String,
    },
    /// Hold a task and its children (an epic's) back from new leases; running work goes on.
    Pause {
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// Why, shown with the tasks it holds.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Let a paused task and its children be leased again.
    Resume {
        #[arg(allow_hyphen_values = true)]
        id: String,
    },
    /// Change a task's title, description, namespace, priority, requirements or cost cap (not
    /// while an agent works on it unless --next-attempt, nor once it is done); its history
    /// records the edit.
    Edit {
        #[arg(allow_hyphen_values = true)]
        id: String,
        #[arg(long)]
        title: Option<String>,
        #[arg(long, conflicts_with = "description_file")]
        description: Option<String>,
        /// Read the description from a file (`-` for standard input).
        #[arg(long)]
        description_file: Option<String>,
        /// An empty value clears it.
        #[arg(long)]
        namespace: Option<String>,
        /// 0 (highest) to 4 (lowest).
        #[arg(long)]
        priority: Option<u32>,
        /// What its runner must have from now on, replacing what it required; repeat for
        /// several, or pass `--requires ''` for nothing.
        #[arg(
            long = "requires",
            value_name = "KEY[=VALUE]",
            allow_hyphen_values = true
        )]
        requires: Vec<String>,
        /// Its own cost cap in cents from now on; on an epic, the cap of its children
        /// together; 0 removes it (the server's default applies again).
        #[arg(long, value_name = "CENTS", allow_hyphen_values = true)]
        max_cost: Option<f64>,
        /// Edit a task an agent is working on (or whose commit waits to land) as well: the
        /// attempt under way keeps its prompt, the next one gets the edit.
        #[arg(long)]
        next_attempt: bool,
    },
    /// Make a task wait for others to be done.
    Depend {
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// The task it waits for; repeat for several.
        #[arg(long = "on", required = true, allow_hyphen_values = true)]
        on: Vec<String>,
    },
}

/// Why a command stopped before its end.
enum Stop {
    /// It failed: one line for stderr and an exit code.
    Failed(Failure),
    /// Stdout could not be written.
    Stdout(io::Error),
}

impl From<Failure> for Stop {
    fn from(failure: Failure) -> Self {
        Stop::Failed(failure)
    }
}

impl From<io::Error> for Stop {
    fn from(err: io::Error) -> Self {
        Stop::Stdout(err)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if let Some(code) = pipeline_core::manual::generate_if_asked::<Cli>() {
        return code;
    }
    let cli = Cli::parse();
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match run(cli, &mut out).await {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`pipelinectl … | head`) ends the process quietly, as other tools do.
        Err(Stop::Stdout(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(Stop::Stdout(e)) => {
            eprintln!("pipelinectl: cannot write to stdout: {e}");
            ExitCode::from(exit::FAILURE)
        }
        Err(Stop::Failed(failure)) => {
            eprintln!("pipelinectl: {}", failure.message);
            ExitCode::from(failure.exit_code)
        }
    }
}

/// Runs one command, printing to `out`.
async fn run(cli: Cli, out: &mut impl Write) -> Result<(), Stop> {
    if let Command::Completions { shell } = cli.command {
        return pipeline_core::manual::completions::<Cli>(shell, out).map_err(Stop::Stdout);
    }
    // Checked before connecting, so that a mistake is reported even with no server.
    let add_description = match &cli.command {
        Command::Task(TaskCommand::Add {
            description,
            description_file,
            from_file: None,
            ..
        }) => Some(read_description(
            description.clone(),
            description_file.as_deref(),
        )?),
        _ => None,
    };
    let token = match &cli.token_file {
        Some(file) => Some(read_token_file(file)?),
        None => cli.token(),
    };
    let mut client = Client::connect(&cli.server, token.as_deref(), cli.tls_ca.as_deref()).await?;
    // A standby's refusal names the leader and did nothing: the command goes there, once per
    // server given at most.
    let mut tries = 1;
    let reads_only = reads_only(&cli.command);
    loop {
        let failure = match execute(
            cli.command.clone(),
            &mut client,
            add_description.clone(),
            out,
        )
        .await
        {
            Err(Stop::Failed(f)) if f.exit_code == exit::UNAVAILABLE => f,
            other => return other,
        };
        if tries > cli.server.split(',').count() {
            return Err(Stop::Failed(failure));
        }
        // A command that changes nothing is asked again of the next server after a lost one
        // too (it may have been done there: asking again does no harm).
        let next = match client.follow_leader().await {
            None if reads_only => client.fail_over().await,
            next => next,
        };
        match next {
            Some(Ok(next)) => client = next,
            Some(Err(_)) | None => return Err(Stop::Failed(failure)),
        }
        tries += 1;
    }
}

/// Whether `command` only reads and prints its answer at the end (asking again is harmless).
/// `watch` and `logs --follow` go to the next server themselves.
fn reads_only(command: &Command) -> bool {
    match command {
        Command::Status { .. }
        | Command::Explain { .. }
        | Command::Completions { .. }
        | Command::Runners { action: None, .. }
        | Command::Queue { action: None, .. } => true,
        Command::Task(task) => matches!(task, TaskCommand::List { .. } | TaskCommand::Show { .. }),
        _ => false,
    }
}

/// Runs `command` on the server of `client`, printing to `out`.
async fn execute(
    command: Command,
    client: &mut Client,
    add_description: Option<String>,
    out: &mut impl Write,
) -> Result<(), Stop> {
    match command {
        Command::Status { json } => {
            let s = client.status().await?;
            output::status(out, &s, Format::for_stdout(json))?;
        }
        Command::Runners { json, action: None } => {
            let runners = client.runners().await?;
            output::runners(out, &runners, Format::for_stdout(json))?;
        }
        Command::Runners {
            action: Some(RunnersAction::Revoke { name }),
            ..
        } => {
            let released = client.revoke_runner(name.clone()).await?;
            writeln!(out, "{name}: revoked; {released} lease(s) given back")?;
        }
        Command::Runners {
            action: Some(RunnersAction::Drain { name }),
            ..
        } => {
            client.drain_runner(name.clone(), true).await?;
            writeln!(
                out,
                "{name}: draining; it finishes what it holds and takes nothing new"
            )?;
        }
        Command::Runners {
            action: Some(RunnersAction::Undrain { name }),
            ..
        } => {
            client.drain_runner(name.clone(), false).await?;
            writeln!(out, "{name}: takes work again")?;
        }
        Command::Runners {
            action: Some(RunnersAction::Forget { name }),
            ..
        } => {
            client.forget_runner(name.clone()).await?;
            writeln!(out, "{name}: forgotten; the name is free")?;
        }
        Command::Queue { json, action: None } => {
            let q = client.queue().await?;
            output::queue(out, &q, Format::for_stdout(json))?;
        }
        Command::Queue {
            action:
                Some(QueueAction::Pause {
                    reason,
                    landing,
                    landing_only,
                }),
            ..
        } => {
            client.pause_queue(reason, landing, landing_only).await?;
            if landing_only {
                writeln!(
                    out,
                    "landing held: nothing lands, leases go on; `pipelinectl queue resume` \
                     lands again"
                )?;
            } else {
                let held = if landing { ", and landing is held" } else { "" };
                writeln!(
                    out,
                    "queue paused: no new leases{held}; `pipelinectl queue resume` goes on"
                )?;
            }
        }
        Command::Queue {
            action: Some(QueueAction::Resume),
            ..
        } => {
            if client.resume_queue().await? {
                writeln!(out, "queue resumed")?;
            } else {
                writeln!(out, "nothing was paused")?;
            }
        }
        Command::Token(TokenCommand::Rotate { viewer: false }) => {
            let (token, path) = client.rotate_registration_token().await?;
            eprintln!("the new runner registration token (also in {path}):");
            writeln!(out, "{token}")?;
        }
        Command::Token(TokenCommand::Rotate { viewer: true }) => {
            let (token, path, ended) = client.rotate_viewer_token().await?;
            eprintln!(
                "the new viewer token (also in {path}); {ended} session{} of the web page ended:",
                if ended == 1 { "" } else { "s" }
            );
            writeln!(out, "{token}")?;
        }
        Command::Task(TaskCommand::Add {
            from_file: Some(path),
            ..
        }) => {
            batch::create_from_file(client, &path, out).await?;
        }
        Command::Task(TaskCommand::Add {
            title,
            namespace,
            priority,
            parent,
            depends_on,
            id,
            requires,
            max_cost,
            approval,
            epic,
            ..
        }) => {
            let title = title.unwrap_or_default();
            let task = client
                .create_task(NewTask {
                    id,
                    title,
                    description: add_description.unwrap_or_default(),
                    namespace,
                    priority,
                    parent,
                    depends_on,
                    requires,
                    max_cost_cents: max_cost,
                    approval,
                    epic,
                })
                .await?;
            writeln!(out, "{}", task.id)?;
        }
        Command::Task(TaskCommand::List {
            status,
            parent,
            limit,
            json,
        }) => {
            let status = status
                .map(|s| {
                    TaskStatus::from_word(&s)
                        .ok_or_else(|| Failure::usage(format!("unknown status {s}")))
                })
                .transpose()?;
            // Page by page, each printed as it arrives: memory stays bounded however many.
            let mut printer = output::TaskListPrinter::new(Format::for_stdout(json));
            let mut left = limit.unwrap_or(u64::MAX);
            let mut token = String::new();
            while left > 0 {
                let size = u32::try_from(left.min(1000)).unwrap_or(1000);
                let (tasks, next) = client
                    .list_tasks(status, parent.clone(), token, size)
                    .await?;
                let tasks = &tasks[..tasks.len().min(usize::try_from(left).unwrap_or(usize::MAX))];
                printer.page(out, tasks)?;
                left -= tasks.len() as u64;
                match next {
                    Some(next) => token = next,
                    None => break,
                }
            }
            printer.finish(out)?;
        }
        Command::Task(TaskCommand::Show { id, json }) => {
            let detail = client.get_task(id).await?;
            output::task_detail(out, &detail, Format::for_stdout(json))?;
        }
        Command::Task(TaskCommand::Pause { id, reason }) => {
            let n = client.pause_task(id.clone(), reason).await?;
            writeln!(
                out,
                "{id}: paused ({n} task{})",
                if n == 1 { "" } else { "s" }
            )?;
        }
        Command::Task(TaskCommand::Resume { id }) => {
            let n = client.resume_task(id.clone()).await?;
            writeln!(
                out,
                "{id}: resumed ({n} task{})",
                if n == 1 { "" } else { "s" }
            )?;
        }
        Command::Task(TaskCommand::Retry { id, note, fresh }) => {
            let task = client.retry_task(id, note, fresh).await?;
            writeln!(out, "{}: {}", task.id, task.status.word())?;
        }
        Command::Task(TaskCommand::Approve { id, note, by }) => {
            let task = client.approve_task(id, note, by.or_else(os_user)).await?;
            writeln!(
                out,
                "{} approved: it lands with the next merge train",
                task.id
            )?;
        }
        Command::Task(TaskCommand::Reject { id, note, by }) => {
            let task = client.reject_task(id, note, by.or_else(os_user)).await?;
            writeln!(
                out,
                "{} rejected: back to {} with the note for its agent",
                task.id,
                task.status.word()
            )?;
        }
        Command::Task(TaskCommand::Cancel { id }) => {
            let task = client.cancel_task(id).await?;
            writeln!(out, "{}: {}", task.id, task.status.word())?;
        }
        Command::Task(TaskCommand::Edit {
            id,
            title,
            description,
            description_file,
            namespace,
            priority,
            requires,
            max_cost,
            next_attempt,
        }) => {
            let description = match (description, description_file) {
                (None, None) => None,
                (d, f) => Some(read_description(d, f.as_deref())?),
            };
            let task = client
                .edit_task(TaskChange {
                    id,
                    title,
                    description,
                    namespace,
                    priority,
                    // `--requires ''` alone clears them.
                    requires: (!requires.is_empty())
                        .then(|| requires.into_iter().filter(|r| !r.is_empty()).collect()),
                    max_cost_cents: max_cost,
                    next_attempt,
                })
                .await?;
            writeln!(out, "{}: edited", task.id)?;
        }
        Command::Task(TaskCommand::Depend { id, on }) => {
            let task = client.add_dependencies(id, on).await?;
            writeln!(out, "{} depends on {}", task.id, task.depends_on.join(", "))?;
        }
        Command::Logs {
            id,
            follow,
            tail,
            since,
            run,
            raw,
        } => {
            if follow {
                // Say once what the task waits for, so a follow that shows nothing is not silent.
                for why in client.waiting_for(id.clone()).await? {
                    eprintln!("{id} is waiting: {why}");
                }
            }
            let mut printer = output::LogPrinter::new(output::stdout_is_terminal());
            printer.attempt = run;
            printer.raw = raw;
            printer.since_ms = since.map(time::ms_ago);
            printer.tail = tail;
            if tail.is_some() {
                // The stored lines first, their last N kept; then, with --follow, the live ones.
                let mut logs = client.task_logs(id.clone(), false).await?;
                while let Some(item) = logs.next().await? {
                    printer.print(out, item)?;
                }
                printer.flush_tail(out)?;
                if !follow {
                    out.flush()?;
                    return no_such_attempt(&id, run, &printer);
                }
            }
            follow_logs(client, &id, follow, &mut printer, out).await?;
            if !follow {
                no_such_attempt(&id, run, &printer)?;
            }
        }
        Command::Watch {
            json,
            all,
            kind,
            after,
            ..
        } if all || !kind.is_empty() || after.is_some() => {
            if !all && kind.is_empty() {
                return Err(Failure::usage(
                    "--after goes with --all or --kind (a task watch resumes by itself)".into(),
                )
                .into());
            }
            watch_feed(client, Format::for_stdout(json), kind, after, out).await?;
        }
        Command::Watch {
            json,
            task,
            parent,
            status,
            ..
        } => {
            let format = Format::for_stdout(json);
            let status = status.as_deref().and_then(TaskStatus::from_word);
            if let Some(id) = task.as_ref().or(parent.as_ref()) {
                // A mistyped ID is said at once, not watched for ever.
                client.get_task(id.clone()).await?;
            }
            // Each task's parent, looked up once, for --parent.
            let mut parents: std::collections::HashMap<String, Option<String>> = Default::default();
            // A server that goes away is waited for, and the watch goes on after the last
            // transition it sent (none lost, none twice). The position is the transition's ID
            // and time (a marker has none), so that a server whose history went back does not
            // take it for another one.
            let mut last: Option<(i64, Option<i64>)> = None;
            let mut pause = std::time::Duration::from_millis(200);
            let mut warned = false;
            loop {
                let read = async {
                    let resumed = last.is_some();
                    let mut transitions = client
                        .watch(last.map(|(id, _)| id), last.and_then(|(_, at)| at))
                        .await?;
                    let mut first = true;
                    while let Some(t) = transitions.next().await? {
                        let t: model::Transition = t;
                        if std::mem::take(&mut first) && resumed && t.task_id.is_empty() {
                            // Its history does not hold where the watch was: it goes on from
                            // where the server started.
                            eprintln!(
                                "pipelinectl: the server's history no longer holds the last \
                                 transition shown (its database went back, e.g. restored from \
                                 a backup); going on from where the server started"
                            );
                        }
                        last = Some((t.event_id, (!t.task_id.is_empty()).then_some(t.at_ms)));
                        pause = std::time::Duration::from_millis(200);
                        warned = false;
                        if t.task_id.is_empty()
                            || task.as_ref().is_some_and(|id| *id != t.task_id)
                            || status.is_some_and(|s| s != t.to)
                        {
                            continue;
                        }
                        if let Some(epic) = &parent
                            && *epic != t.task_id
                        {
                            let of = match parents.get(&t.task_id) {
                                Some(p) => p.clone(),
                                None => {
                                    let p = client.get_task(t.task_id.clone()).await?.task.parent;
                                    parents.insert(t.task_id.clone(), p.clone());
                                    p
                                }
                            };
                            if of.as_ref() != Some(epic) {
                                continue;
                            }
                        }
                        output::transition(out, &t, format)?;
                        out.flush()?;
                    }
                    Ok::<(), Stop>(())
                };
                match read.await {
                    // The server ended the stream (it is stopping): watch again.
                    Ok(()) => {}
                    Err(Stop::Failed(f)) if f.exit_code == exit::UNAVAILABLE => {
                        // Said once an outage, not at every try; after a stream was open,
                        // as the connection lost it is.
                        if !std::mem::replace(&mut warned, true) {
                            match last {
                                Some(_) => eprintln!(
                                    "pipelinectl: lost the connection to the pipeline server \
                                     at {}; waiting for it",
                                    client.url()
                                ),
                                None => eprintln!("pipelinectl: {}; waiting for it", f.message),
                            }
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(std::time::Duration::from_secs(5));
                        // With several servers given, the next one that can be reached.
                        if let Some(Ok(next)) = client.fail_over().await {
                            *client = next;
                        }
                    }
                    Err(other) => return Err(other),
                }
            }
        }
        Command::Explain { id } => {
            let detail = client.get_task(id).await?;
            output::explain(out, &detail)?;
        }
        // Answered above, before connecting.
        Command::Completions { .. } => {}
    }
    out.flush()?;
    Ok(())
}

/// `watch --all` / `--kind`: the change feed's entries, live, after `after` if given; a
/// server that goes away is waited for, and the watch goes on after the last position it
/// sent (none lost, none twice).
async fn watch_feed(
    client: &mut Client,
    format: Format,
    topics: Vec<String>,
    after: Option<i64>,
    out: &mut impl Write,
) -> Result<(), Stop> {
    let mut last = after;
    let mut pause = std::time::Duration::from_millis(200);
    let mut warned = false;
    loop {
        let read = async {
            let mut entries = client.change_feed(last, topics.clone()).await?;
            let mut first = true;
            while let Some(e) = entries.next().await? {
                if std::mem::take(&mut first) && last.is_some() && e.topic.is_empty() {
                    eprintln!(
                        "pipelinectl: the server's feed does not hold position {} (its database \
                         went back, e.g. restored from a backup); going on from where the \
                         server started",
                        last.unwrap_or_default()
                    );
                }
                last = Some(e.position);
                pause = std::time::Duration::from_millis(200);
                warned = false;
                if e.topic.is_empty() {
                    continue;
                }
                output::feed_entry(out, &e, format)?;
            }
            Ok::<(), Stop>(())
        };
        match read.await {
            // The server ended the stream (it is stopping): watch again.
            Ok(()) => {}
            Err(Stop::Failed(f)) if f.exit_code == exit::UNAVAILABLE => {
                if !std::mem::replace(&mut warned, true) {
                    eprintln!("pipelinectl: {}; waiting for it", f.message);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
                // With several servers given, the next one that can be reached.
                if let Some(Ok(next)) = client.fail_over().await {
                    *client = next;
                }
            }
            Err(other) => return Err(other),
        }
    }
}

/// Prints a task's logs; with `follow`, until the task is final, waiting for a server that goes
/// away and resuming where the stream was (the printer skips lines it has printed).
async fn follow_logs(
    client: &mut Client,
    id: &str,
    follow: bool,
    printer: &mut output::LogPrinter,
    out: &mut impl Write,
) -> Result<(), Stop> {
    let mut pause = std::time::Duration::from_millis(200);
    let (mut warned, mut connected) = (false, false);
    loop {
        let read = async {
            let mut logs = client.task_logs(id.to_owned(), follow).await?;
            connected = true;
            while let Some(item) = logs.next().await? {
                if let Some(status) = printer.print(out, item)?
                    && follow
                    && status.is_final()
                {
                    return Ok::<bool, Stop>(true);
                }
                out.flush()?;
            }
            Ok(!follow)
        };
        match read.await {
            Ok(true) => return Ok(()),
            // The server ended the stream (it is stopping): read it again.
            Ok(false) => {}
            Err(Stop::Failed(f)) if follow && f.exit_code == exit::UNAVAILABLE => {
                // Said once an outage, not at every try; after a stream was open, as the
                // connection lost it is.
                if !std::mem::replace(&mut warned, true) {
                    if connected {
                        eprintln!(
                            "pipelinectl: lost the connection to the pipeline server at {}; \
                             waiting for it",
                            client.url()
                        );
                    } else {
                        eprintln!("pipelinectl: {}; waiting for it", f.message);
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
                // With several servers given, the next one that can be reached.
                if let Some(Ok(next)) = client.fail_over().await {
                    *client = next;
                }
                continue;
            }
            Err(other) => return Err(other),
        }
        pause = std::time::Duration::from_millis(200);
        warned = false;
    }
}

/// `logs --run N` of an attempt the task has not had: said so, rather than printing nothing.
fn no_such_attempt(id: &str, run: Option<u32>, printer: &output::LogPrinter) -> Result<(), Stop> {
    let Some(n) = run else { return Ok(()) };
    let attempts = printer.attempts();
    if attempts.contains(&n) {
        return Ok(());
    }
    let had = match attempts.last() {
        None => "it has no runs yet".to_owned(),
        Some(last) => format!("its attempts are 1 to {last}"),
    };
    Err(Stop::Failed(Failure {
        message: format!("task {id} has no attempt {n}: {had}"),
        exit_code: exit::NOT_FOUND,
    }))
}

/// A duration as people write it: `90s`, `10m`, `2h`, `1d`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (write it like 90s, 10m, 2h or 1d)"))
}

/// The token in `--token-file`: its content, trimmed; an unreadable or empty file is refused.
fn read_token_file(file: &std::path::Path) -> Result<String, Failure> {
    let token = std::fs::read_to_string(file)
        .map_err(|e| Failure::usage(format!("cannot read --token-file {}: {e}", file.display())))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(Failure::usage(format!(
            "--token-file {} is empty",
            file.display()
        )));
    }
    Ok(token.to_owned())
}

fn read_description(inline: Option<String>, file: Option<&str>) -> Result<String, Failure> {
    match (inline, file) {
        (Some(d), _) => Ok(d),
        (None, None) => Ok(String::new()),
        (None, Some("-")) => {
            let mut buf = String::new();
            std::io::stdin().read_to_string(&mut buf).map_err(|e| {
                Failure::usage(format!("cannot read the description from stdin: {e}"))
            })?;
            Ok(buf)
        }
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| Failure::usage(format!("cannot read --description-file {path}: {e}"))),
    }
}

/// The person at this terminal, as the OS names them (`$USER`, else `$LOGNAME`), for the
/// history of an approval or a rejection; `None` when neither is set.
fn os_user() -> Option<String> {
    ["USER", "LOGNAME"]
        .into_iter()
        .find_map(|v| std::env::var(v).ok())
        .filter(|u| !u.trim().is_empty())
}
