//! The `pipeline-runner` binary: parse the flags, set up logging, run until drained (first
//! SIGTERM/SIGINT) or stopped (second signal). Started as `pipeline-runner __pipeline-guard
//! PROGRAM…` it is the guard of one agent or build instead (`pipeline_core::guard`).

use std::process::ExitCode;

use clap::Parser;
use pipeline_runner::config::Config;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    if let Some(code) = pipeline_core::guard::enter() {
        return code;
    }
    if let Some(code) = pipeline_core::manual::generate_if_asked::<Config>() {
        return code;
    }
    pipeline_core::process::install_guard();
    let config = Config::parse();
    // Before any thread: a token in the environment is shed by executing this binary again.
    if let Err(why) = config.shed_token_env() {
        eprintln!("pipeline-runner: {why}");
        return ExitCode::FAILURE;
    }
    runner(config)
}

#[tokio::main]
async fn runner(config: Config) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let drain = CancellationToken::new();
    let stop = CancellationToken::new();
    tokio::spawn(watch_signals(drain.clone(), stop.clone()));
    match pipeline_runner::run(config, drain, stop).await {
        Ok(finished) => {
            tracing::info!(?finished, "runner exited");
            ExitCode::from(finished.exit_code())
        }
        Err(err) => {
            // One line, whatever the causes' texts hold.
            let line = format!("{err:#}");
            let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("pipeline-runner: {line}");
            ExitCode::FAILURE
        }
    }
}

/// First SIGTERM/SIGINT drains; the second stops at once.
async fn watch_signals(drain: CancellationToken, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received: draining (send another to stop now)");
    drain.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: stopping now");
    stop.cancel();
}
