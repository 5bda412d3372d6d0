//! The `rebeld` command: parses arguments, wires the library, maps errors to exit codes.
//!
//! Exit codes: 0 success, 1 a runtime failure, 2 bad usage or configuration.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rebeld::config::{Config, DeviceSetting, ModelConfig, Objective, Secret};
use rebeld::daemon::TerminationSignals;
use rebeld::device::DeviceInventory;
use rebeld::eval::{evaluate, evaluate_by_segment, EvalData, EvalOptions};
use rebeld::event::Content;
use rebeld::experiment::learner::{Labels, Schedule};
use rebeld::experiment::setting::Shape;
use rebeld::experiment::shift::{self, ShiftOptions};
use rebeld::model::generate::{Policy, Sampling};
use rebeld::model::import::{self, ImportError};
use rebeld::model::logprobs::Limits;
use rebeld::model::weights::SaveDtype;
use rebeld::pull::{self, PullOptions};
use rebeld::replay::schedule::{check_segments, NamedFile, Schedule as TrafficSchedule};
use rebeld::replay::{self, ReplayFormat, ReplayInput, ReplayOptions, SegmentPlan};
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
    /// Download the latest checkpoint version into a folder, verified, switched atomically.
    Pull(PullArgs),
    /// Implicit-reward accuracy of a policy against a reference on held-out pairs.
    Eval(EvalArgs),
    /// Convert a model from another format into a Hugging Face model folder.
    #[command(subcommand)]
    Import(ImportCommand),
    /// Answer one prompt with a model folder (chat template, KV cache, stops at EOS).
    Generate(GenerateArgs),
    /// Measure the objectives in controlled settings.
    #[command(subcommand)]
    Experiment(ExperimentCommand),
}

#[derive(Subcommand)]
enum ExperimentCommand {
    /// Train on one preference mixture, judge under others, in the log-linear setting of
    /// the analysis (exact, on CPU); prints a Markdown table of means with 95% intervals.
    Shift(ShiftArgs),
}

#[derive(clap::Args)]
struct ShiftArgs {
    /// Feature dimension d.
    #[arg(long, default_value_t = 8)]
    dim: usize,
    /// Number K of reward objectives.
    #[arg(long, default_value_t = 3)]
    objectives: usize,
    /// Candidate responses per context.
    #[arg(long, default_value_t = 8)]
    responses: usize,
    /// Number of contexts.
    #[arg(long, default_value_t = 64)]
    contexts: usize,
    /// Total training pairs, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "250,1000,4000,16000")]
    n: Vec<usize>,
    /// Radii of chi2, kl and wasserstein, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5")]
    radii: Vec<f64>,
    /// Objectives compared.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "rebel,chi2,kl,wasserstein,dpo"
    )]
    methods: Vec<String>,
    /// Number of seeds.
    #[arg(long, default_value_t = 10)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Shares of the user types who label the pairs (default: halving, e.g. 4/7,2/7,1/7).
    #[arg(long, value_delimiter = ',')]
    train_mixture: Option<Vec<f64>>,
    /// Held-out mixtures, `;` between mixtures, e.g. "0.5,0.5,0;0,0,1" (default: the train
    /// mixture, halfway to uniform, uniform, each objective alone).
    #[arg(long)]
    test_mixtures: Option<String>,
    /// REBEL rounds; each samples its share of the pairs from the current policy.
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// β of the KL regularization (and of DPO).
    #[arg(long, default_value_t = 1.0)]
    beta: f64,
    /// η of REBEL's regression target.
    #[arg(long, default_value_t = 0.5)]
    eta: f64,
    /// Size of the rewards: E‖θ*_k‖² is its square.
    #[arg(long, default_value_t = 2.0)]
    reward_scale: f64,
    /// How pairs are labelled.
    #[arg(long, value_enum, default_value_t = Labels::Scores)]
    labels: Labels,
    /// The confidence a preference stands for, with --labels preferences.
    #[arg(long, default_value_t = 0.75)]
    confidence: f64,
    /// Order p of the Wasserstein ambiguity set.
    #[arg(long, default_value_t = 2.0)]
    order: f64,
    /// Worker threads (default: the available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Also write the table as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct PullArgs {
    /// The rebeld server, e.g. http://10.0.0.5:8080 (plain HTTP).
    #[arg(long)]
    server: String,
    /// The folder to keep at the latest version (rebeld pull makes it a symlink to
    /// DIR.vNNNNNNNN beside it).
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Keep DIR current: wait for new versions (and rollbacks) until SIGINT/SIGTERM.
    #[arg(long)]
    follow: bool,
    /// Bearer token of the read scope.
    #[arg(long, env = "REBELD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Longest long-poll to ask of the server while following.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    wait: std::time::Duration,
    /// Attempts of a pull without --follow before giving up on transient errors.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    attempts: u32,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// The evaluated policy's folder (config.json, weights, tokenizer.json). Repeat it to
    /// evaluate several policies with one tokenizer against one reference: the pairs are read
    /// and the reference scored once, and each policy gets its own report, in order.
    #[arg(long = "model", id = "models", value_name = "DIR", required = true)]
    models: Vec<PathBuf>,
    /// The reference model's folder (the same architecture and tokenizer).
    #[arg(long)]
    reference: PathBuf,
    /// Held-out pairs: rebeld events or TRL records, JSONL or JSONL.gz; or --segment
    /// instead.
    #[arg(
        long,
        required_unless_present = "segments",
        conflicts_with = "segments"
    )]
    data: Option<PathBuf>,
    /// A named file of held-out pairs, NAME=FILE (repeat it), scored as one segment each.
    #[arg(
        long = "segment",
        id = "segments",
        value_name = "NAME=FILE",
        requires = "by_segment"
    )]
    segments: Vec<NamedFile>,
    /// Report each segment (the --segment files, or the `segment` tags of the --data file),
    /// the overall figures and the worst segment.
    #[arg(long)]
    by_segment: bool,
    /// Print each report as one JSON object on its own line, with the policy's folder as
    /// `model`.
    #[arg(long)]
    json: bool,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Prompts keep their last this many tokens (default: model.max_prompt_tokens's).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Responses keep their first this many tokens (default: model.max_response_tokens's).
    #[arg(long)]
    max_response_tokens: Option<usize>,
    /// Evaluate at most this many pairs (of each segment, with --by-segment).
    #[arg(long)]
    limit: Option<usize>,
    /// How each line is read.
    #[arg(long, value_enum, default_value_t = ReplayFormat::Rebeld)]
    format: ReplayFormat,
    /// Keep only the held-out slice of this share (the training daemon's
    /// checkpoint.holdout_fraction): pairs it never trained on.
    #[arg(long, value_name = "FRACTION")]
    held_out: Option<f64>,
}

#[derive(Subcommand)]
enum ImportCommand {
    /// A llama-architecture GGUF file (F32, F16, BF16, Q4_0, Q4_1, Q8_0 tensors).
    Gguf {
        /// The GGUF file.
        file: PathBuf,
        /// The model folder to create; it must not exist.
        out_dir: PathBuf,
        /// The dtype of the written weights.
        #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
        dtype: WeightDtype,
    },
}

/// The dtype of saved weights.
#[derive(Clone, Copy, clap::ValueEnum)]
enum WeightDtype {
    /// 32-bit floats: exact for every dequantized GGUF type.
    F32,
    /// bfloat16: half the size, rounded.
    Bf16,
}

impl From<WeightDtype> for SaveDtype {
    fn from(dtype: WeightDtype) -> Self {
        match dtype {
            WeightDtype::F32 => SaveDtype::F32,
            WeightDtype::Bf16 => SaveDtype::BF16,
        }
    }
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The model folder (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    model: PathBuf,
    /// The user message.
    #[arg(long)]
    prompt: String,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `cpu`, `cuda:N` or `auto`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The input file (`.gz` is decompressed); or --segment instead.
    #[arg(required_unless_present = "segments", conflicts_with = "segments")]
    file: Option<PathBuf>,
    /// A named input, NAME=FILE (repeat it): the files' events are interleaved as --schedule
    /// says, each tagged with `segment` NAME.
    #[arg(long = "segment", id = "segments", value_name = "NAME=FILE")]
    segments: Vec<NamedFile>,
    /// Each segment's share of the events at the start and at the end of the run, moving
    /// linearly with the event count: NAME:START-END or NAME:SHARE, comma-separated
    /// (default: equal shares).
    #[arg(long)]
    schedule: Option<String>,
    /// Seed of the draws that pick each event's segment (with --segment).
    #[arg(long, default_value_t = 0)]
    seed: u64,
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
    /// Stop after this many events; with --segment, the run's length, which --schedule
    /// spans (default: every usable line of the segments).
    #[arg(long)]
    limit: Option<u64>,
    /// Start over at the end of the file (with --segment: a segment that runs out starts
    /// over instead of ending the run); resent events keep their ids, so the daemon counts
    /// them as duplicates.
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
        Command::Pull(args) => pull(args),
        Command::Eval(args) => eval(args),
        Command::Import(ImportCommand::Gguf {
            file,
            out_dir,
            dtype,
        }) => import_gguf(&file, &out_dir, dtype.into()),
        Command::Generate(args) => generate(args),
        Command::Experiment(ExperimentCommand::Shift(args)) => shift(args),
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

fn eval(args: EvalArgs) -> Result<(), Failure> {
    let setting = DeviceSetting::parse(&args.device).ok_or_else(|| {
        Failure::usage(anyhow::anyhow!(
            "--device {:?}: expected auto, cpu or cuda:N",
            args.device
        ))
    })?;
    if args.held_out.is_some_and(|f| !(0.0..=1.0).contains(&f)) {
        return Err(Failure::usage(anyhow::anyhow!(
            "--held-out must be a share between 0 and 1"
        )));
    }
    if args.batch_size == 0 {
        return Err(Failure::usage(anyhow::anyhow!(
            "--batch-size must be at least 1"
        )));
    }
    let device = DeviceInventory::probe()
        .resolve(setting)
        .map_err(Failure::usage)?;
    let data = match args.data {
        Some(file) => EvalData::File(file),
        None => {
            check_segments(&args.segments).map_err(Failure::usage)?;
            EvalData::Segments(args.segments)
        }
    };
    let defaults = ModelConfig::default();
    let options = EvalOptions {
        models: args.models,
        reference: args.reference,
        data,
        device,
        batch_size: args.batch_size,
        limits: Limits {
            max_prompt_tokens: args.max_prompt_tokens.unwrap_or(defaults.max_prompt_tokens),
            max_response_tokens: args
                .max_response_tokens
                .unwrap_or(defaults.max_response_tokens),
        },
        limit: args.limit,
        format: args.format,
        held_out: args.held_out,
    };
    let reports: Vec<(String, serde_json::Value)> = if args.by_segment {
        let reports = evaluate_by_segment(&options).map_err(Failure::runtime)?;
        reports
            .iter()
            .map(|r| (r.to_string(), r.to_json()))
            .collect()
    } else {
        let reports = evaluate(&options).map_err(Failure::runtime)?;
        reports
            .iter()
            .map(|r| (r.to_string(), r.to_json()))
            .collect()
    };
    let several = reports.len() > 1;
    for (model, (text, mut json)) in options.models.iter().zip(reports) {
        if args.json {
            json["model"] = serde_json::Value::from(model.display().to_string());
            println!("{json}");
        } else if several {
            println!("model {}\n{text}\n", model.display());
        } else {
            println!("{text}");
        }
    }
    Ok(())
}

fn replay(args: ReplayArgs) -> Result<(), Failure> {
    let input = match args.file {
        Some(_) if args.schedule.is_some() => {
            return Err(Failure::usage(anyhow::anyhow!(
                "--schedule shares out --segment inputs, not a FILE"
            )));
        }
        Some(file) => ReplayInput::File(file),
        None => ReplayInput::Segments(segment_plan(args.segments, args.schedule, args.seed)?),
    };
    let brokers = match args.brokers {
        Some(brokers) => brokers,
        None => embedded_brokers(&args.data_dir).map_err(Failure::usage)?,
    };
    let options = ReplayOptions {
        input,
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
    for (segment, count) in &summary.segments {
        println!("  segment {segment}: {count} events");
    }
    if let Some(segment) = &summary.exhausted {
        println!(
            "segment {segment} ran out of lines after {} events; the run ended early \
             (--loop starts a segment over)",
            summary.sent
        );
    }
    Ok(())
}

/// The segments, checked, and their schedule.
fn segment_plan(
    segments: Vec<NamedFile>,
    schedule: Option<String>,
    seed: u64,
) -> Result<SegmentPlan, Failure> {
    check_segments(&segments).map_err(Failure::usage)?;
    let schedule = match schedule {
        Some(text) => {
            let names: Vec<&str> = segments.iter().map(|s| s.name.as_str()).collect();
            TrafficSchedule::parse(&text, &names).map_err(Failure::usage)?
        }
        None => TrafficSchedule::uniform(segments.len()),
    };
    Ok(SegmentPlan {
        segments,
        schedule,
        seed,
    })
}

fn pull(args: PullArgs) -> Result<(), Failure> {
    let options = PullOptions {
        server: args.server,
        to: args.to,
        token: args.token.map(Secret::new),
        follow: args.follow,
        wait: args.wait,
        attempts: args.attempts,
    };
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    let outcome = if options.follow {
        let signals = runtime
            .block_on(async { TerminationSignals::install() })
            .map_err(Failure::runtime)?;
        runtime.block_on(pull::follow(&options, first_signal(signals)))
    } else {
        runtime.block_on(pull::pull_once(&options)).map(|version| {
            println!("{} is at version {version}", options.to.display());
        })
    };
    outcome.map_err(|error| {
        if error.is_usage() {
            Failure::usage(error)
        } else {
            Failure::runtime(error)
        }
    })
}

async fn first_signal(mut signals: TerminationSignals) {
    signals.recv().await;
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

fn import_gguf(file: &Path, out_dir: &Path, dtype: SaveDtype) -> Result<(), Failure> {
    let summary = import::import_gguf(file, out_dir, dtype).map_err(|e| match e {
        ImportError::Exists(_) => Failure::usage(e),
        other => Failure::runtime(other),
    })?;
    println!(
        "wrote {}: {} tensors, {} parameters, vocabulary of {}",
        summary.dir.display(),
        summary.tensors,
        summary.parameters,
        summary.vocab_size
    );
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<(), Failure> {
    let setting = DeviceSetting::parse(&args.device).ok_or_else(|| {
        Failure::usage(anyhow::anyhow!(
            "--device {:?}: expected auto, cpu or cuda:N",
            args.device
        ))
    })?;
    let device = DeviceInventory::probe()
        .resolve(setting)
        .map_err(Failure::usage)?;
    let sampling = Sampling {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    sampling.validate().map_err(Failure::usage)?;
    let policy = Policy::load(&args.model, device).map_err(Failure::runtime)?;
    let output = policy
        .generate(&Content::Text(args.prompt), &sampling)
        .map_err(Failure::runtime)?;
    println!("{}", output.text);
    Ok(())
}

fn shift(args: ShiftArgs) -> Result<(), Failure> {
    let options = shift_options(&args).map_err(Failure::usage)?;
    options.validate().map_err(Failure::usage)?;

    // One libtorch thread per worker: the tensors are small and the workers fill the cores.
    tch::set_num_threads(1);
    let started = std::time::Instant::now();
    let progress = |done: u64, total: u64| {
        let seconds = started.elapsed().as_secs_f64();
        eprintln!("rebeld: seed {done} of {total} done after {seconds:.0} s");
    };
    let report = shift::run(&options, &progress).map_err(Failure::runtime)?;

    print!("{report}");
    if let Some(path) = args.json {
        let text = serde_json::to_string_pretty(&report).map_err(Failure::runtime)?;
        std::fs::write(&path, text).map_err(|e| {
            Failure::runtime(anyhow::anyhow!("cannot write {}: {e}", path.display()))
        })?;
    }
    Ok(())
}

/// The experiment's options from its flags, with the mixtures' defaults filled in.
fn shift_options(args: &ShiftArgs) -> anyhow::Result<ShiftOptions> {
    let objectives = args
        .methods
        .iter()
        .map(|name| {
            let quoted = serde_json::Value::String(name.clone());
            serde_json::from_value(quoted)
                .map_err(|_| anyhow::anyhow!("--methods: {name:?} is not an objective"))
        })
        .collect::<anyhow::Result<Vec<Objective>>>()?;
    let train_mixture = args
        .train_mixture
        .clone()
        .unwrap_or_else(|| shift::default_train_mixture(args.objectives));
    let test_mixtures = match &args.test_mixtures {
        Some(text) => parse_mixtures(text)?,
        None => shift::default_test_mixtures(&train_mixture),
    };
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });

    Ok(ShiftOptions {
        shape: Shape {
            dim: args.dim,
            objectives: args.objectives,
            responses: args.responses,
            contexts: args.contexts,
            reward_scale: args.reward_scale,
            beta: args.beta,
        },
        schedule: Schedule {
            rounds: args.rounds,
            eta: args.eta,
            train_mixture,
            labels: args.labels,
            confidence: args.confidence,
            wasserstein_order: args.order,
        },
        sizes: args.n.clone(),
        radii: args.radii.clone(),
        objectives,
        test_mixtures,
        seeds: args.seeds,
        first_seed: args.first_seed,
        threads,
    })
}

/// Mixtures written "a,b,c;d,e,f".
fn parse_mixtures(text: &str) -> anyhow::Result<Vec<Vec<f64>>> {
    text.split(';')
        .map(|mixture| {
            mixture
                .split(',')
                .map(|w| w.trim().parse::<f64>())
                .collect::<Result<Vec<f64>, _>>()
                .map_err(|e| anyhow::anyhow!("--test-mixtures: {mixture:?}: {e}"))
        })
        .collect()
}

fn check_config(file: PathBuf) -> Result<(), Failure> {
    let config = Config::load(Some(&file)).map_err(Failure::usage)?;
    print!("{}", config.to_masked_toml());
    Ok(())
}
