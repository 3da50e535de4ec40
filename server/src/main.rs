//! The `pipeline-server` binary: parse the flags, set up logging (and with `--otlp-endpoint`
//! the span export, `telemetry`), run until SIGINT or SIGTERM.
//! Started as `pipeline-server __pipeline-guard PROGRAM…` it is the guard of one build or
//! agent instead (`pipeline_core::guard`).

use std::process::ExitCode;

use clap::Parser;
use pipeline_server::app::Stopped;
use pipeline_server::config::Config;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    if let Some(code) = pipeline_core::guard::enter() {
        return code;
    }
    if let Some(code) = pipeline_core::manual::generate_if_asked::<Config>() {
        return code;
    }
    pipeline_core::process::install_guard();
    server()
}

#[tokio::main]
async fn server() -> ExitCode {
    let config = Config::parse();
    let otlp = match config.otlp_traces_url().transpose() {
        Ok(url) => url,
        Err(why) => {
            eprintln!("pipeline-server: {why}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match pipeline_server::telemetry::init(otlp.as_deref()) {
        Ok(telemetry) => telemetry,
        Err(why) => {
            eprintln!("pipeline-server: {why}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    // The handlers are installed here, before anything starts: a signal that comes while the
    // server starts stops it gracefully too (a handler installed later by the spawned task
    // could miss it, and the default action kills the process).
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => {
            tokio::spawn(watch_signals(term, int, shutdown.clone()));
        }
        _ => tracing::error!("cannot install signal handlers; stop the server with SIGKILL"),
    }
    let stopped = pipeline_server::app::run(config, shutdown).await;
    // The last spans go out before the process ends (a blocking flush, off the runtime's
    // workers).
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    match stopped {
        Ok(Stopped::Idle { needs_help }) if needs_help > 0 => {
            eprintln!("pipeline-server: idle, and {needs_help} task(s) need help");
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pipeline-server: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM; a second signal exits at once.
async fn watch_signals(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting now");
    pipeline_server::admin_note::withdraw();
    std::process::exit(130);
}
