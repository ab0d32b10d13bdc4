//! The `outbox-relay` command line: `run` starts the daemon, `check` tells whether a setup is
//! ready for it, `status` shows its slot.

use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outbox_relay::config::Config;
use tracing_subscriber::EnvFilter;

/// Relays transactional outbox rows from a PostgreSQL logical replication slot to Kafka.
#[derive(Parser)]
#[command(name = "outbox-relay", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay until SIGTERM or SIGINT.
    Run {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check the config, PostgreSQL and Kafka without changing anything; one line per check,
    /// exit 0 only if all pass.
    Check {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the replication slot's state and lag; exit 0 if the slot exists and is usable,
    /// 1 if not, 2 if the config or PostgreSQL could not be read.
    Status {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `status`: the slot is missing, lost or not a pgoutput slot of this database.
const EXIT_SLOT_UNUSABLE: u8 = 1;
/// `check` found a failure.
const EXIT_CHECK_FAILED: u8 = 1;
/// `status`: the config or PostgreSQL could not be read at all.
const EXIT_UNREADABLE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => return check(&config),
        Command::Status { config, json } => return status(&config, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

fn print_error(e: &anyhow::Error) {
    // One line: the cause chain joined, as operators grep logs line by line. Many of our
    // errors already quote their source in their own message; don't say it twice.
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if text.is_empty() {
            text = cause;
        } else if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    eprintln!("outbox-relay: error: {}", text.replace('\n', " "));
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn check(config_path: &Path) -> ExitCode {
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            print_error(&e.context("cannot start the async runtime"));
            return ExitCode::from(EXIT_UNREADABLE);
        }
    };
    let mut stdout = std::io::stdout();
    let passed = runtime.block_on(outbox_relay::ops::check::run(config_path, &mut |line| {
        // A closed stdout (`| head`) must not panic; the exit code still tells the result.
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    }));
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CHECK_FAILED)
    }
}

fn status(config_path: &Path, json: bool) -> ExitCode {
    let status = runtime().and_then(|rt| {
        rt.block_on(outbox_relay::ops::status::read(config_path))
            .map_err(anyhow::Error::from)
    });
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            print_error(&e);
            return ExitCode::from(EXIT_UNREADABLE);
        }
    };
    let text = if json {
        outbox_relay::ops::status::render_json(&status) + "\n"
    } else {
        outbox_relay::ops::status::render_text(&status)
    };
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
    if status.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_SLOT_UNUSABLE)
    }
}

fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(outbox_relay::pipeline::run::run(config, shutdown_signal()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        // Without a SIGTERM handler, fall back to Ctrl-C only.
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
