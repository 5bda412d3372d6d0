//! The `rebeld` command: parses arguments, wires the library, maps errors to exit codes.
//!
//! Exit codes: 0 success, 1 a runtime failure, 2 bad usage or configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rebeld::config::Config;
use rebeld::daemon::TerminationSignals;
use rebeld::replay::{self, ReplayFormat, ReplayOptions};
use rebeld::telemetry::{self, LogFormat};
use rebeld::version::VersionReport;

#[derive(Parser)]
#[command(
    name = "rebeld",
    version,
    about = "Continual LLM alignment from live user feedback"
)]
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
    /// Produce preference events from a JSONL or JSONL.gz file.
    Replay(ReplayArgs),
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The input file (`.gz` is decompressed).
    file: PathBuf,
    /// How each line is read.
    #[arg(long, value_enum, default_value_t = ReplayFormat::Rebeld)]
    format: ReplayFormat,
    /// Bootstrap list; defaults to the embedded cluster of a daemon running with --data-dir.
    #[arg(long)]
    brokers: Option<String>,
    /// The data folder of a daemon running on embedded brokers.
    #[arg(long, default_value = "var")]
    data_dir: PathBuf,
    /// Destination topic.
    #[arg(long, default_value = "rebeld.preferences")]
    topic: String,
    /// Events per second (default: as fast as the broker takes them).
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many events.
    #[arg(long)]
    limit: Option<u64>,
    /// Start over at the end of the file; resent events keep their ids, so the daemon
    /// counts them as duplicates.
    #[arg(long = "loop")]
    repeat: bool,
    /// No progress lines.
    #[arg(long, short)]
    quiet: bool,
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
        Self {
            code: 2,
            error: error.into(),
        }
    }

    fn runtime(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: 1,
            error: error.into(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);

    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("rebeld: {}", one_line(&failure.error));
            ExitCode::from(failure.code)
        }
    }
}

/// The whole cause chain on one line. A cause whose text its parent already quotes is not
/// repeated (many messages embed their source's text).
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run { config } => run(config),
        Command::Config(ConfigCommand::Check { file }) => check_config(file),
        Command::Replay(args) => replay(args),
        Command::Version => {
            println!("{}", VersionReport::collect());
            Ok(())
        }
    }
}

fn run(path: Option<PathBuf>) -> Result<(), Failure> {
    let config = Config::load(path.as_deref()).map_err(Failure::usage)?;
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;

    let outcome = runtime.block_on(async {
        let signals = TerminationSignals::install().map_err(Failure::runtime)?;
        rebeld::daemon::run(config, stop_signal(signals))
            .await
            .map_err(Failure::runtime)
    });
    // A task past the shutdown deadline may be stuck in a blocking call: do not wait for it.
    runtime.shutdown_background();
    outcome
}

/// The first SIGINT/SIGTERM starts a clean stop; a second one exits at once.
async fn stop_signal(mut signals: TerminationSignals) {
    signals.recv().await;
    tokio::spawn(async move {
        signals.recv().await;
        eprintln!("rebeld: second signal, exiting without waiting for a clean stop");
        std::process::exit(130);
    });
}

fn replay(args: ReplayArgs) -> Result<(), Failure> {
    let brokers = match args.brokers {
        Some(brokers) => brokers,
        None => embedded_brokers(&args.data_dir).map_err(Failure::usage)?,
    };
    let options = ReplayOptions {
        file: args.file,
        format: args.format,
        brokers,
        topic: args.topic,
        rate: args.rate,
        limit: args.limit,
        repeat: args.repeat,
        progress: !args.quiet,
    };
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    let summary = runtime
        .block_on(replay::replay(&options))
        .map_err(Failure::runtime)?;

    println!(
        "sent {} events, skipped {} lines",
        summary.sent,
        summary.skipped_total()
    );
    for (reason, count) in &summary.skipped {
        println!("  skipped {count}: {reason}");
    }
    Ok(())
}

fn embedded_brokers(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join(rebeld::embedded_kafka::BOOTSTRAP_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        anyhow::anyhow!(
            "no --brokers given and cannot read {} ({e}); is `rebeld run` up?",
            path.display()
        )
    })?;
    Ok(text.trim().to_owned())
}

fn check_config(file: PathBuf) -> Result<(), Failure> {
    let config = Config::load(Some(&file)).map_err(Failure::usage)?;
    print!("{}", config.to_masked_toml());
    Ok(())
}
