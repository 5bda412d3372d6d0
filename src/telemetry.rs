//! Structured logs through `tracing`.
//!
//! One line per event, fields instead of interpolated text. The filter comes from
//! `REBELD_LOG` (or `RUST_LOG`), in `tracing-subscriber`'s env-filter syntax, and defaults to
//! `info` for rebeld and `warn` for everything else.

use tracing_subscriber::{fmt, EnvFilter};

/// The variable holding a log filter such as `rebeld=debug,rdkafka=info`.
pub const LOG_ENV: &str = "REBELD_LOG";

const DEFAULT_FILTER: &str = "warn,rebeld=info";

/// How log lines are written to standard error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable, one line per event.
    #[default]
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let filter = std::env::var(LOG_ENV)
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|text| EnvFilter::try_new(text).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));

    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    let installed = match format {
        LogFormat::Pretty => builder.compact().try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    if let Err(error) = installed {
        eprintln!("logging was already initialised: {error}");
    }
}
