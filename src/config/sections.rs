//! The sections of the TOML file as serde reads them: the first stage of loading.
//!
//! Every field is documented here, and every default is a named function so the embedded
//! `config/rebeld.toml` and the code cannot drift apart silently. Values are only parsed here;
//! ranges and cross-field rules are checked in [`super::Config::from_raw`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::bytes::ByteSize;
use super::secret::Secret;

/// The whole file, before validation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// Process-wide settings: device, state folder, shutdown.
    pub runtime: RawRuntime,
    /// Where preference events come from.
    pub kafka: RawKafka,
    /// The rolling buffer of preference pairs.
    pub buffer: BufferConfig,
    /// The policy being trained.
    pub model: ModelConfig,
    /// The DRO-REBEL update.
    pub train: TrainConfig,
    /// Publication of versioned checkpoints.
    pub checkpoint: CheckpointConfig,
    /// The checkpoint API.
    pub server: RawServer,
    /// The Prometheus endpoint.
    pub metrics: RawMetrics,
}

/// `[runtime]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRuntime {
    /// `"auto"` (CUDA when present, else CPU), `"cpu"` or `"cuda:N"`.
    pub device: String,
    /// Folder for snapshots, resume state and published versions; created when missing.
    pub data_dir: PathBuf,
    /// How long SIGINT/SIGTERM may take to drain and stop every task.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// libtorch intra-op threads; 0 keeps libtorch's own choice (one per core).
    pub torch_threads: usize,
}

impl Default for RawRuntime {
    fn default() -> Self {
        Self {
            device: default_device(),
            data_dir: default_data_dir(),
            shutdown_timeout: default_shutdown_timeout(),
            torch_threads: 0,
        }
    }
}

fn default_device() -> String {
    "auto".into()
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("var")
}

/// Long enough to write a resume state of a small model on a slow disk.
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `[kafka]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawKafka {
    /// `"embedded"` starts librdkafka's in-process mock cluster; anything else is a
    /// bootstrap list such as `"kafka-0:9092,kafka-1:9092"`.
    pub brokers: String,
    /// Topic of preference events.
    pub topic: String,
    /// Where rejected messages go; empty means `<topic>.dlq`.
    pub dead_letter_topic: String,
    /// Where a notice is produced on each promoted version.
    pub checkpoints_topic: String,
    /// Consumer group; each rank of a scale-out shares it.
    pub group_id: String,
    /// Where a partition with no snapshot and no committed offset starts.
    pub auto_offset_reset: OffsetReset,
    /// Partitions of each topic the embedded cluster creates.
    pub embedded_partitions: i32,
    /// Messages larger than this are dead-lettered as `too_large`.
    pub max_message_bytes: ByteSize,
    /// SASL user name, passed to librdkafka as `sasl.username`.
    pub sasl_username: Option<String>,
    /// SASL password, passed as `sasl.password`; never printed.
    pub sasl_password: Option<Secret>,
    /// Further librdkafka properties (`security.protocol`, `ssl.ca.location`, …). rebeld owns
    /// `bootstrap.servers`, `group.id` and offset handling, which cannot be set here. Numbers
    /// and booleans may be written bare (`"session.timeout.ms" = 6000`).
    #[serde(deserialize_with = "property_values")]
    pub properties: BTreeMap<String, String>,
}

impl Default for RawKafka {
    fn default() -> Self {
        Self {
            brokers: "embedded".into(),
            topic: default_topic(),
            dead_letter_topic: String::new(),
            checkpoints_topic: default_checkpoints_topic(),
            group_id: "rebeld".into(),
            auto_offset_reset: OffsetReset::Earliest,
            embedded_partitions: 3,
            max_message_bytes: default_max_message_bytes(),
            sasl_username: None,
            sasl_password: None,
            properties: BTreeMap::new(),
        }
    }
}

fn default_topic() -> String {
    "rebeld.preferences".into()
}

fn default_checkpoints_topic() -> String {
    "rebeld.checkpoints".into()
}

/// librdkafka's own default for `message.max.bytes`.
fn default_max_message_bytes() -> ByteSize {
    ByteSize(1_000_000)
}

/// Start position of a partition nothing is known about.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    /// The oldest retained message.
    Earliest,
    /// Only messages produced from now on.
    Latest,
}

/// `[buffer]`: the rolling window of preference pairs.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Most pairs held; the oldest are evicted first.
    pub max_rows: usize,
    /// Most Arrow memory held.
    pub max_bytes: ByteSize,
    /// Pairs ingested longer ago than this are evicted.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Keep prompt and response text beside the token ids (for inspection; costs memory).
    pub keep_text: bool,
    /// How often the buffer and partition offsets are snapshotted and offsets committed.
    #[serde(with = "humantime_serde")]
    pub snapshot_every: Duration,
    /// How many recent event ids are remembered to skip duplicates.
    pub dedup_window: usize,
    /// How the trainer draws minibatches.
    pub sampling: Sampling,
    /// With `sampling = "recency"`, the age at which a pair is half as likely to be drawn.
    #[serde(with = "humantime_serde")]
    pub recency_half_life: Duration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            max_rows: 200_000,
            max_bytes: ByteSize(1 << 30),
            max_age: Duration::from_secs(7 * 24 * 3600),
            keep_text: false,
            snapshot_every: Duration::from_secs(60),
            dedup_window: 1_000_000,
            sampling: Sampling::Uniform,
            recency_half_life: Duration::from_secs(3600),
        }
    }
}

/// Minibatch sampling strategy.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// Every held pair equally likely.
    Uniform,
    /// Newer pairs more likely, halving every `recency_half_life`.
    Recency,
}

/// `[model]`: the policy.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A Hugging Face layout folder (`config.json`, `tokenizer.json`, `model.safetensors`).
    pub path: PathBuf,
    /// Prompts longer than this keep their last tokens.
    pub max_prompt_tokens: usize,
    /// Responses longer than this are cut (and get no EOS).
    pub max_response_tokens: usize,
    /// What to do with a prompt over `max_prompt_tokens`.
    pub prompt_too_long: PromptTooLong,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("models/smollm2-135m-instruct"),
            max_prompt_tokens: 512,
            max_response_tokens: 256,
            prompt_too_long: PromptTooLong::Truncate,
        }
    }
}

/// Policy for prompts over the token limit.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PromptTooLong {
    /// Keep the last `max_prompt_tokens` tokens.
    Truncate,
    /// Dead-letter the event as `prompt_too_long`.
    Drop,
}

/// `[train]`: the DRO-REBEL update.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// How a batch's pointwise losses become the step's loss.
    pub objective: Objective,
    /// Radius ρ of the ambiguity set (`chi2`, `kl`, `wasserstein`); 0 reduces to `rebel`.
    pub radius: f64,
    /// η in REBEL's regression target: the policy log-ratio difference is scaled by 1/η.
    pub eta: f64,
    /// Peak AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Linear warm-up steps to the peak learning rate.
    pub warmup_steps: u64,
    /// Learning-rate schedule after warm-up.
    pub schedule: Schedule,
    /// With `schedule = "cosine"`, steps over which the rate decays to zero.
    pub cosine_steps: u64,
    /// Gradients are clipped to this global L2 norm; 0 disables clipping.
    pub max_grad_norm: f64,
    /// Pairs per optimizer step.
    pub batch_size: usize,
    /// Pairs per forward/backward; `batch_size` must be a multiple of it.
    pub micro_batch_size: usize,
    /// The most forward passes a micro-batch's sequences are split into by length, so that
    /// few positions are padding; 1 pads every sequence to the micro-batch's longest.
    pub length_buckets: usize,
    /// Training waits until the buffer holds at least this many pairs.
    pub min_pairs: usize,
    /// The anchor policy is refreshed every this many steps; 0 means at each published version.
    pub anchor_refresh_steps: u64,
    /// β of the optional KL-to-reference shaping of the reward difference.
    pub beta: f64,
    /// Multiplies every reward difference.
    pub reward_scale: f64,
    /// Confidence assumed for a preference that carries none, in (0.5, 1).
    pub default_confidence: f64,
    /// Events generated by a policy more than this many versions old are skipped; 0 disables.
    pub max_staleness: u64,
    /// After this many non-finite steps in a row the last good state is restored.
    pub max_consecutive_skips: u32,
    /// Order p ≥ 1 of the Wasserstein ambiguity set.
    pub wasserstein_order: f64,
    /// A fixed temperature τ for `kl` instead of solving for it from the radius.
    pub kl_temperature: Option<f64>,
    /// β of the `dpo` and `ipo` baselines.
    pub dpo_beta: f64,
    /// Objective name → weight; a pair whose responses both carry every weighted objective
    /// gets its reward difference from scores, the others from their preference.
    pub mixture: BTreeMap<String, f64>,
    /// Reject events whose scores name objectives missing from `mixture`.
    pub strict_objectives: bool,
    /// User segments reported on their own in metrics; every other segment is `other`.
    pub segments: Vec<String>,
    /// Seed of the sampler and of any randomness in training.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            objective: Objective::Chi2,
            radius: 0.1,
            eta: 1.0,
            learning_rate: 1e-6,
            weight_decay: 0.0,
            warmup_steps: 10,
            schedule: Schedule::Constant,
            cosine_steps: 10_000,
            max_grad_norm: 1.0,
            batch_size: 8,
            micro_batch_size: 8,
            length_buckets: 4,
            min_pairs: 32,
            anchor_refresh_steps: 0,
            beta: 0.0,
            reward_scale: 1.0,
            default_confidence: 0.75,
            max_staleness: 0,
            max_consecutive_skips: 5,
            wasserstein_order: 2.0,
            kl_temperature: None,
            dpo_beta: 0.1,
            mixture: BTreeMap::new(),
            strict_objectives: false,
            segments: Vec::new(),
            seed: 0,
        }
    }
}

/// `train.objective`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Plain REBEL: the mean pointwise loss.
    Rebel,
    /// Worst case over a chi-squared ball around the batch.
    Chi2,
    /// Worst case over a KL ball around the batch.
    Kl,
    /// First-order Wasserstein dual: a gradient penalty on the input embeddings.
    Wasserstein,
    /// Direct Preference Optimization against the initial model (a baseline).
    Dpo,
    /// Identity Preference Optimization (a baseline).
    Ipo,
}

/// `train.schedule`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// The peak rate after warm-up.
    Constant,
    /// Cosine decay to zero over `cosine_steps`.
    Cosine,
}

/// `[checkpoint]`: publication of versions.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Publish after this many optimizer steps …
    pub publish_every_steps: u64,
    /// … or after this long, whichever comes first.
    #[serde(with = "humantime_serde")]
    pub publish_every: Duration,
    /// … and only when at least this many pairs were trained since the last version.
    pub min_new_pairs: u64,
    /// Newest versions kept on disk (pinned versions are kept besides).
    pub keep_versions: usize,
    /// Precision of the published `model.safetensors`.
    pub dtype: WeightDtype,
    /// Share of events (by id hash) held out of training for the publication gates.
    pub holdout_fraction: f64,
    /// Held-out pairs (the newest) the gates score at each publication.
    pub gate_pairs: usize,
    /// A version whose held-out implicit-reward accuracy is lower than the latest's by more
    /// than this is rejected.
    pub max_accuracy_drop: f64,
    /// A version whose mean per-token KL to the latest exceeds this is rejected.
    pub max_kl: f64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            publish_every_steps: 100,
            publish_every: Duration::from_secs(600),
            min_new_pairs: 64,
            keep_versions: 5,
            dtype: WeightDtype::Bf16,
            holdout_fraction: 0.02,
            gate_pairs: 64,
            max_accuracy_drop: 0.02,
            max_kl: 0.05,
        }
    }
}

/// Weight precision of a published version.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// bfloat16: half the bytes, what inference servers load.
    Bf16,
    /// float32: exact master weights.
    F32,
}

/// `[server]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// Address of the checkpoint API, `IP:PORT`.
    pub listen: String,
    /// Allow unauthenticated reads on a non-loopback listener.
    pub allow_anonymous: bool,
    /// Bearer tokens with the read scope.
    pub read_tokens: Vec<Secret>,
    /// Bearer tokens with the admin scope (promote, pin); they can read as well.
    pub admin_tokens: Vec<Secret>,
    /// A request that takes longer is cut (downloads excepted, which are paced by the client).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Downloads served at once; more are answered 503.
    pub max_concurrent_downloads: usize,
    /// Longest `wait` a long-poll may ask for.
    #[serde(with = "humantime_serde")]
    pub max_long_poll: Duration,
    /// The API's address as inference hosts reach it, for the URLs in promotion notices;
    /// empty means `http://` and `listen`.
    pub public_url: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            allow_anonymous: false,
            read_tokens: Vec::new(),
            admin_tokens: Vec::new(),
            request_timeout: Duration::from_secs(30),
            max_concurrent_downloads: 64,
            max_long_poll: Duration::from_secs(60),
            public_url: String::new(),
        }
    }
}

/// `[metrics]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    /// Address of the Prometheus endpoint `/metrics`, `IP:PORT`.
    pub listen: String,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// librdkafka takes every property as a string; accept TOML numbers and booleans too.
fn property_values<'de, D>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Text(String),
        Integer(i64),
        Float(f64),
        Flag(bool),
    }

    let written = BTreeMap::<String, Written>::deserialize(deserializer)?;
    Ok(written
        .into_iter()
        .map(|(key, value)| {
            let text = match value {
                Written::Text(text) => text,
                Written::Integer(n) => n.to_string(),
                Written::Float(x) => x.to_string(),
                Written::Flag(b) => b.to_string(),
            };
            (key, text)
        })
        .collect())
}
