//! The `rebeld` command: parses arguments, wires the library, maps errors to exit codes.
//!
//! Exit codes: 0 success, 1 a runtime failure, 2 bad usage or configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rebeld::config::Config;
use rebeld::telemetry::{self, LogFormat};
use rebeld::version::VersionReport;

#[derive(Parser)]
#[command(name = "rebeld", version, about = "Continual LLM alignment from live user feedback")]
struct Cli {
    /// How log lines are written to standard error (filter with REBELD_LOG).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGINT or SIGTERM.
    Run {
        /// TOML configuration; without it the embedded default (config/rebeld.toml) is used.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Inspect configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the versions of rebeld, libtorch and librdkafka and the CUDA devices seen.
    Version,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a file and print the resolved configuration with secrets masked.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

/// A failure and the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self { code: 2, error: error.into() }
    }

    fn runtime(error: impl Into<anyhow::Error>) -> Self {
        Self { code: 1, error: error.into() }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);

    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("rebeld: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run { config } => run(config),
        Command::Config(ConfigCommand::Check { file }) => check_config(file),
        Command::Version => {
            println!("{}", VersionReport::collect());
            Ok(())
        }
    }
}

fn run(path: Option<PathBuf>) -> Result<(), Failure> {
    let config = Config::load(path.as_deref()).map_err(Failure::usage)?;
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;

    runtime
        .block_on(rebeld::daemon::run(config, stop_signal()))
        .map_err(Failure::runtime)
}

/// The first SIGINT/SIGTERM starts a clean stop; a second one exits at once.
async fn stop_signal() {
    rebeld::daemon::termination_signal().await;
    tokio::spawn(async {
        rebeld::daemon::termination_signal().await;
        eprintln!("rebeld: second signal, exiting without waiting for a clean stop");
        std::process::exit(130);
    });
}

fn check_config(file: PathBuf) -> Result<(), Failure> {
    let config = Config::load(Some(&file)).map_err(Failure::usage)?;
    print!("{}", config.to_masked_toml());
    Ok(())
}
