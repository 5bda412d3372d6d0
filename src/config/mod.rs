//! Configuration: TOML read in two stages.
//!
//! 1. [`RawConfig`] mirrors the file: serde with `deny_unknown_fields`, every default a
//!    named value, durations and sizes typed, secrets wrapped.
//! 2. [`Config::from_raw`] checks ranges and cross-field rules and resolves what the file
//!    leaves implicit (listeners, the device, the dead-letter topic). A [`Config`] exists
//!    only after validation.
//!
//! Environment variables `REBELD__SECTION__KEY=value` override the file; a value is read as
//! a TOML value when it parses as one (`0.5`, `true`, `["a", "b"]`) and as a string otherwise.

mod bytes;
mod secret;
mod sections;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use bytes::ByteSize;
pub use secret::{Secret, MASK};
pub use sections::{
    BufferConfig, CheckpointConfig, ModelConfig, Objective, OffsetReset, PromptTooLong, RawConfig,
    RawKafka, RawMetrics, RawRuntime, RawServer, Sampling, Schedule, TrainConfig, WeightDtype,
};

/// The configuration the daemon starts with when given no file.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/rebeld.toml");

/// Prefix of environment overrides: `REBELD__TRAIN__RADIUS=0.2`.
pub const ENV_PREFIX: &str = "REBELD__";

/// Why a configuration was refused. Each displays as one line naming the key and value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O failure.
        source: std::io::Error,
    },
    /// The text is not TOML.
    #[error("{origin}: not valid TOML: {message}")]
    Syntax {
        /// File name or `embedded default`.
        origin: String,
        /// The parser's message, folded to one line.
        message: String,
    },
    /// A key is unknown, or a value has the wrong type or spelling.
    #[error("{origin}: {key} = {value}: {message}")]
    Field {
        /// File name or `embedded default`.
        origin: String,
        /// Dotted key, e.g. `train.radius`.
        key: String,
        /// The offending value as written.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// A value is well-formed but out of range or inconsistent with another.
    #[error("{key} = {value}: {message}")]
    Invalid {
        /// Dotted key.
        key: String,
        /// The offending value.
        value: String,
        /// The rule it breaks.
        message: String,
    },
}

impl ConfigError {
    fn invalid(key: &str, value: impl std::fmt::Display, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.to_owned(),
            value: value.to_string(),
            message: message.into(),
        }
    }
}

/// Where the device setting points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSetting {
    /// CUDA device 0 when libtorch sees one, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// A CUDA device by index.
    Cuda(usize),
}

impl DeviceSetting {
    /// Reads `auto`, `cpu` or `cuda:N`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "auto" => Some(Self::Auto),
            "cpu" => Some(Self::Cpu),
            _ => text.strip_prefix("cuda:")?.parse().ok().map(Self::Cuda),
        }
    }
}

impl std::fmt::Display for DeviceSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

impl Serialize for DeviceSetting {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// `[runtime]`, validated.
#[derive(Clone, Debug, Serialize)]
pub struct RuntimeConfig {
    /// Where tensors live.
    pub device: DeviceSetting,
    /// Folder for snapshots, resume state and versions.
    pub data_dir: PathBuf,
    /// Deadline for a clean stop.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// libtorch intra-op threads; 0 keeps libtorch's choice.
    pub torch_threads: usize,
}

/// Which Kafka the daemon talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Brokers {
    /// librdkafka's in-process mock cluster, started by the daemon.
    Embedded,
    /// A bootstrap list.
    Bootstrap(String),
}

impl Serialize for Brokers {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Embedded => serializer.serialize_str("embedded"),
            Self::Bootstrap(list) => serializer.serialize_str(list),
        }
    }
}

/// `[kafka]`, validated.
#[derive(Clone, Debug, Serialize)]
pub struct KafkaConfig {
    /// The cluster.
    pub brokers: Brokers,
    /// Topic of preference events.
    pub topic: String,
    /// Topic of rejected messages (resolved from `<topic>.dlq` when left empty).
    pub dead_letter_topic: String,
    /// Topic of version notices.
    pub checkpoints_topic: String,
    /// Consumer group.
    pub group_id: String,
    /// Start of a partition with no stored position.
    pub auto_offset_reset: OffsetReset,
    /// Partitions per topic in the embedded cluster.
    pub embedded_partitions: i32,
    /// Largest accepted message value.
    pub max_message_bytes: ByteSize,
    /// SASL user name.
    pub sasl_username: Option<String>,
    /// SASL password.
    pub sasl_password: Option<Secret>,
    /// librdkafka pass-through properties.
    pub properties: std::collections::BTreeMap<String, String>,
}

/// `[server]`, validated.
#[derive(Clone, Debug, Serialize)]
pub struct ServerConfig {
    /// Listener of the checkpoint API.
    pub listen: SocketAddr,
    /// Unauthenticated reads allowed off loopback.
    pub allow_anonymous: bool,
    /// Read-scope tokens.
    pub read_tokens: Vec<Secret>,
    /// Admin-scope tokens.
    pub admin_tokens: Vec<Secret>,
    /// Per-request deadline.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Concurrent download cap.
    pub max_concurrent_downloads: usize,
    /// Longest long-poll.
    #[serde(with = "humantime_serde")]
    pub max_long_poll: Duration,
    /// Base URL of the API in promotion notices, without a trailing slash.
    pub public_url: String,
}

/// `[metrics]`, validated.
#[derive(Clone, Debug, Serialize)]
pub struct MetricsConfig {
    /// Listener of `/metrics`.
    pub listen: SocketAddr,
}

/// A validated configuration: the only kind the daemon runs with.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// Process-wide settings.
    pub runtime: RuntimeConfig,
    /// Kafka.
    pub kafka: KafkaConfig,
    /// Rolling buffer.
    pub buffer: BufferConfig,
    /// Policy model.
    pub model: ModelConfig,
    /// Trainer.
    pub train: TrainConfig,
    /// Publication.
    pub checkpoint: CheckpointConfig,
    /// Checkpoint API.
    pub server: ServerConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
}

impl Config {
    /// Loads `path`, or the embedded default when `None`, applies `REBELD__*` overrides from
    /// the process environment and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// [`Config::load`] with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (origin, text) = match path {
            Some(path) => (path.display().to_string(), read_file(path)?),
            None => ("embedded default".to_owned(), EMBEDDED_DEFAULT.to_owned()),
        };
        Self::from_toml(&origin, &text, env)
    }

    /// Parses TOML text, applies overrides and validates; `origin` names the source in errors.
    pub fn from_toml(
        origin: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    origin: origin.to_owned(),
                    message: one_line(e.message()),
                })?;
        apply_env_overrides(&mut table, env);

        let raw = deserialize_raw(origin, table)?;
        Self::from_raw(raw)
    }

    /// The second stage: range checks, cross-field rules and resolution.
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        validate_buffer(&raw.buffer)?;
        validate_model(&raw.model)?;
        validate_train(&raw.train)?;
        validate_checkpoint(&raw.checkpoint)?;

        let config = Self {
            runtime: resolve_runtime(raw.runtime)?,
            kafka: resolve_kafka(raw.kafka)?,
            buffer: raw.buffer,
            model: raw.model,
            train: raw.train,
            checkpoint: raw.checkpoint,
            server: resolve_server(raw.server)?,
            metrics: MetricsConfig {
                listen: parse_listener("metrics.listen", &raw.metrics.listen)?,
            },
        };
        config.check_listeners_differ()?;
        Ok(config)
    }

    /// The resolved configuration as TOML, secrets masked (including librdkafka properties
    /// whose names say they hold one).
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        for (key, value) in shown.kafka.properties.iter_mut() {
            if is_sensitive(key) {
                *value = MASK.to_owned();
            }
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}"))
    }

    fn check_listeners_differ(&self) -> Result<(), ConfigError> {
        // Port 0 asks the OS for a free port, so two such listeners never collide.
        if self.server.listen == self.metrics.listen && self.server.listen.port() != 0 {
            return Err(ConfigError::invalid(
                "metrics.listen",
                self.metrics.listen,
                "must differ from server.listen",
            ));
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Sets `REBELD__A__B=v` as key `a.b` of the table, creating sections as needed.
fn apply_env_overrides(table: &mut toml::Table, env: impl IntoIterator<Item = (String, String)>) {
    for (name, value) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(str::to_lowercase).collect();
        set_path(table, &keys, env_value(&keys, &value));
    }
}

fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) {
    let Some((last, parents)) = keys.split_last() else {
        return;
    };

    let mut current = table;
    for key in parents {
        let entry = current
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let Some(next) = entry.as_table_mut() else {
            return;
        };
        current = next;
    }
    current.insert(last.clone(), value);
}

/// Credentials and librdkafka properties are strings whatever they look like (a password may
/// be `12345`); anything else is read as TOML when it parses as TOML.
fn env_value(keys: &[String], text: &str) -> toml::Value {
    let joined = keys.join(".");
    let string_valued = joined.starts_with("kafka.properties.")
        || (is_sensitive(&joined) && !text.trim_start().starts_with('['));
    if string_valued {
        return toml::Value::String(text.to_owned());
    }
    parse_env_value(text)
}

fn parse_env_value(text: &str) -> toml::Value {
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_owned()))
}

fn deserialize_raw(origin: &str, table: toml::Table) -> Result<RawConfig, ConfigError> {
    let value = toml::Value::Table(table.clone());
    serde_path_to_error::deserialize(value).map_err(|error| {
        let key = error.path().to_string();
        let (value, message) = if is_sensitive(&key) {
            (
                MASK.to_owned(),
                "invalid value (not shown: the key holds a secret)".to_owned(),
            )
        } else {
            let value = lookup(&table, &key).unwrap_or_else(|| "(absent)".into());
            (value, one_line(&error.inner().to_string()))
        };
        ConfigError::Field {
            origin: origin.to_owned(),
            value,
            message,
            key,
        }
    })
}

/// Keys whose values are credentials: never echoed in errors or `config check`.
pub fn is_sensitive(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    let last = key.rsplit('.').next().unwrap_or_default();
    // `max_prompt_tokens` counts tokens of text; `read_tokens` holds bearer tokens.
    let token_count = last.starts_with("max_");
    let names_tokens = last
        .split(['_', '-'])
        .any(|w| w == "token" || w == "tokens");
    ["password", "secret", "sasl.oauthbearer", "ssl.key"]
        .iter()
        .any(|word| key.contains(word))
        || (names_tokens && !token_count)
}

/// The value at a dotted key, as TOML would write it.
fn lookup(table: &toml::Table, dotted: &str) -> Option<String> {
    let mut keys = dotted.split('.');
    let mut value = table.get(keys.next()?)?;
    for key in keys {
        value = value.as_table()?.get(key)?;
    }
    Some(value.to_string())
}

fn resolve_runtime(raw: RawRuntime) -> Result<RuntimeConfig, ConfigError> {
    let device = DeviceSetting::parse(&raw.device).ok_or_else(|| {
        ConfigError::invalid(
            "runtime.device",
            format!("{:?}", raw.device),
            "expected \"auto\", \"cpu\" or \"cuda:N\"",
        )
    })?;
    if raw.shutdown_timeout.is_zero() {
        return Err(ConfigError::invalid(
            "runtime.shutdown_timeout",
            "0s",
            "must be positive",
        ));
    }
    Ok(RuntimeConfig {
        device,
        data_dir: raw.data_dir,
        shutdown_timeout: raw.shutdown_timeout,
        torch_threads: raw.torch_threads,
    })
}

/// Properties rebeld sets itself; letting the file override them would break exactly-once.
const OWNED_KAFKA_PROPERTIES: [&str; 5] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
];

fn resolve_kafka(raw: RawKafka) -> Result<KafkaConfig, ConfigError> {
    let brokers = match raw.brokers.trim() {
        "" => {
            return Err(ConfigError::invalid(
                "kafka.brokers",
                "\"\"",
                "must not be empty",
            ))
        }
        "embedded" => Brokers::Embedded,
        list => Brokers::Bootstrap(list.to_owned()),
    };
    for (key, value) in [
        ("kafka.topic", &raw.topic),
        ("kafka.group_id", &raw.group_id),
    ] {
        if value.trim().is_empty() {
            return Err(ConfigError::invalid(key, "\"\"", "must not be empty"));
        }
    }
    if let Some(owned) = raw
        .properties
        .keys()
        .find(|k| OWNED_KAFKA_PROPERTIES.contains(&k.as_str()))
    {
        return Err(ConfigError::invalid(
            &format!("kafka.properties.\"{owned}\""),
            &raw.properties[owned],
            "is set by rebeld itself; use the [kafka] keys instead",
        ));
    }
    if raw.embedded_partitions < 1 {
        return Err(ConfigError::invalid(
            "kafka.embedded_partitions",
            raw.embedded_partitions,
            "must be at least 1",
        ));
    }

    let dead_letter_topic = match raw.dead_letter_topic.trim() {
        "" => format!("{}.dlq", raw.topic),
        topic => topic.to_owned(),
    };
    if dead_letter_topic == raw.topic {
        return Err(ConfigError::invalid(
            "kafka.dead_letter_topic",
            &dead_letter_topic,
            "must differ from kafka.topic",
        ));
    }
    Ok(KafkaConfig {
        brokers,
        topic: raw.topic,
        dead_letter_topic,
        checkpoints_topic: raw.checkpoints_topic,
        group_id: raw.group_id,
        auto_offset_reset: raw.auto_offset_reset,
        embedded_partitions: raw.embedded_partitions,
        max_message_bytes: raw.max_message_bytes,
        sasl_username: raw.sasl_username,
        sasl_password: raw.sasl_password,
        properties: raw.properties,
    })
}

fn resolve_server(raw: RawServer) -> Result<ServerConfig, ConfigError> {
    let listen = parse_listener("server.listen", &raw.listen)?;
    let has_read_token = !raw.read_tokens.is_empty() || !raw.admin_tokens.is_empty();
    if !listen.ip().is_loopback() && !has_read_token && !raw.allow_anonymous {
        return Err(ConfigError::invalid(
            "server.listen",
            listen,
            "is not a loopback address: set server.read_tokens or server.allow_anonymous = true",
        ));
    }
    if raw
        .read_tokens
        .iter()
        .chain(&raw.admin_tokens)
        .any(Secret::is_empty)
    {
        return Err(ConfigError::invalid(
            "server.read_tokens",
            MASK,
            "a token is empty",
        ));
    }
    positive_count(
        "server.max_concurrent_downloads",
        raw.max_concurrent_downloads,
    )?;

    Ok(ServerConfig {
        listen,
        allow_anonymous: raw.allow_anonymous,
        read_tokens: raw.read_tokens,
        admin_tokens: raw.admin_tokens,
        request_timeout: raw.request_timeout,
        max_concurrent_downloads: raw.max_concurrent_downloads,
        max_long_poll: raw.max_long_poll,
        public_url: public_url(&raw.public_url, listen)?,
    })
}

/// `server.public_url`, or `http://` and the listener; an `http(s)` URL without a trailing
/// slash.
fn public_url(written: &str, listen: SocketAddr) -> Result<String, ConfigError> {
    if written.is_empty() {
        return Ok(format!("http://{listen}"));
    }
    if !(written.starts_with("http://") || written.starts_with("https://")) {
        return Err(ConfigError::invalid(
            "server.public_url",
            format!("{written:?}"),
            "not an http:// or https:// URL",
        ));
    }
    Ok(written.trim_end_matches('/').to_owned())
}

fn parse_listener(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        ConfigError::invalid(key, format!("{text:?}"), "not a listener address IP:PORT")
    })
}

fn validate_buffer(buffer: &BufferConfig) -> Result<(), ConfigError> {
    positive_count("buffer.max_rows", buffer.max_rows)?;
    positive_count("buffer.dedup_window", buffer.dedup_window)?;
    if buffer.max_bytes.bytes() == 0 {
        return Err(ConfigError::invalid(
            "buffer.max_bytes",
            buffer.max_bytes,
            "must be positive",
        ));
    }
    for (key, duration) in [
        ("buffer.max_age", buffer.max_age),
        ("buffer.snapshot_every", buffer.snapshot_every),
        ("buffer.recency_half_life", buffer.recency_half_life),
    ] {
        if duration.is_zero() {
            return Err(ConfigError::invalid(key, "0s", "must be positive"));
        }
    }
    Ok(())
}

fn validate_model(model: &ModelConfig) -> Result<(), ConfigError> {
    positive_count("model.max_prompt_tokens", model.max_prompt_tokens)?;
    positive_count("model.max_response_tokens", model.max_response_tokens)
}

fn validate_train(train: &TrainConfig) -> Result<(), ConfigError> {
    positive_real("train.learning_rate", train.learning_rate)?;
    positive_real("train.eta", train.eta)?;
    positive_real("train.reward_scale", train.reward_scale)?;
    positive_real("train.dpo_beta", train.dpo_beta)?;
    non_negative_real("train.radius", train.radius)?;
    non_negative_real("train.beta", train.beta)?;
    non_negative_real("train.weight_decay", train.weight_decay)?;
    non_negative_real("train.max_grad_norm", train.max_grad_norm)?;

    if !(train.default_confidence > 0.5 && train.default_confidence < 1.0) {
        return Err(ConfigError::invalid(
            "train.default_confidence",
            train.default_confidence,
            "must lie in (0.5, 1): a certain preference has an infinite logit",
        ));
    }
    if !(train.wasserstein_order >= 1.0 && train.wasserstein_order.is_finite()) {
        return Err(ConfigError::invalid(
            "train.wasserstein_order",
            train.wasserstein_order,
            "must be a finite number at least 1",
        ));
    }
    if let Some(temperature) = train.kl_temperature {
        positive_real("train.kl_temperature", temperature)?;
    }
    for (objective, weight) in &train.mixture {
        if !weight.is_finite() {
            return Err(ConfigError::invalid(
                &format!("train.mixture.{objective}"),
                weight,
                "must be finite",
            ));
        }
    }
    validate_batching(train)
}

fn validate_batching(train: &TrainConfig) -> Result<(), ConfigError> {
    positive_count("train.batch_size", train.batch_size)?;
    positive_count("train.micro_batch_size", train.micro_batch_size)?;
    positive_count("train.length_buckets", train.length_buckets)?;
    if !train.batch_size.is_multiple_of(train.micro_batch_size) {
        return Err(ConfigError::invalid(
            "train.micro_batch_size",
            train.micro_batch_size,
            format!("must divide train.batch_size = {}", train.batch_size),
        ));
    }
    if train.min_pairs < train.batch_size {
        return Err(ConfigError::invalid(
            "train.min_pairs",
            train.min_pairs,
            format!("must be at least train.batch_size = {}", train.batch_size),
        ));
    }
    positive_count(
        "train.max_consecutive_skips",
        train.max_consecutive_skips as usize,
    )
}

fn validate_checkpoint(checkpoint: &CheckpointConfig) -> Result<(), ConfigError> {
    positive_count("checkpoint.keep_versions", checkpoint.keep_versions)?;
    positive_count("checkpoint.gate_pairs", checkpoint.gate_pairs)?;
    if !(0.0..1.0).contains(&checkpoint.holdout_fraction) {
        return Err(ConfigError::invalid(
            "checkpoint.holdout_fraction",
            checkpoint.holdout_fraction,
            "must lie in [0, 1)",
        ));
    }
    non_negative_real("checkpoint.max_accuracy_drop", checkpoint.max_accuracy_drop)?;
    non_negative_real("checkpoint.max_kl", checkpoint.max_kl)?;
    if checkpoint.publish_every.is_zero() {
        return Err(ConfigError::invalid(
            "checkpoint.publish_every",
            "0s",
            "must be positive",
        ));
    }
    Ok(())
}

fn positive_real(key: &str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value > 0.0 {
        return Ok(());
    }
    Err(ConfigError::invalid(
        key,
        value,
        "must be a positive finite number",
    ))
}

fn non_negative_real(key: &str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value >= 0.0 {
        return Ok(());
    }
    Err(ConfigError::invalid(
        key,
        value,
        "must be a finite number, zero or more",
    ))
}

fn positive_count(key: &str, value: usize) -> Result<(), ConfigError> {
    if value > 0 {
        return Ok(());
    }
    Err(ConfigError::invalid(key, value, "must be at least 1"))
}

#[cfg(test)]
mod tests;
