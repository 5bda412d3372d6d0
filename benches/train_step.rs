//! One chi2-REBEL training step, against the same step in plain PyTorch and TRL's DPO step,
//! on the same model, weights, HH-RLHF pairs and thread count, in the same run:
//! `cargo bench --bench train_step` (prints a table; never a test).
//!
//! rebeld's step is [`Trainer::step`] on a batch that fits one micro-batch: a forward with
//! gradients of both responses of every pair, anchor log-probs from a cache filled before
//! timing, the chi2 dual solve on the detached losses, the weighted backward through the same
//! graph, the global norm clip and AdamW. `benches/train_step.py`
//! repeats that step in PyTorch (same padding: both use one right-padded batch of `2m`
//! sequences) and times `DPOTrainer.training_step` plus the optimizer step.
//!
//! Settings from the environment: `REBELD_BENCH_THREADS` (default 2), `REBELD_BENCH_MODELS`
//! (`name=folder:pairs` comma-separated; default the tiny fixture and SmolLM2-135M),
//! `REBELD_BENCH_STEPS` (timed steps, default 3), `REBELD_BENCH_DEVICE` (`cpu` or `cuda`),
//! `REBELD_BENCH_BF16` (set to 1 to train in bf16), `REBELD_BENCH_BASELINES` (set to 0 to
//! run rebeld alone, as `benches/gpu.sh` does), `REBELD_BENCH_PROMPT_TOKENS` and
//! `REBELD_BENCH_RESPONSE_TOKENS` (default 48 and 24), `REBELD_BENCH_KEEP_BATCH` (set to
//! keep the baselines' batch file, for `benches/train_step.py FILE --profile`),
//! `REBELD_BENCH_ROOT` (the repository root, default the one it was built in),
//! `REBELD_BENCH_HH` (the HH-RLHF file, relative to the root) and
//! `REBELD_BENCH_LENGTH_BUCKETS` (default 1: rebeld pads as the baselines do; with N > 1
//! rebeld's step is timed a second time with `train.length_buckets = N`, its sequences split
//! into at most N forward passes by length, and compared with the padded baselines: the
//! real-length comparison, run with the daemon's limits of 512 and 256 tokens).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rebeld::buffer::{PairRecord, Preference};
use rebeld::config::{Objective, TrainConfig};
use rebeld::event::hh_rlhf::split_dialogues;
use rebeld::event::Content;
use rebeld::model::buckets::padded_tokens;
use rebeld::model::llama::Llama;
use rebeld::model::logprobs::{Limits, Sequence};
use rebeld::model::tokenizer::PolicyTokenizer;
use rebeld::train::reward::RewardSpec;
use rebeld::train::step::{pair_logprobs, StepConfig, TrainPair, Trainer};
use serde_json::{json, Value};
use tch::nn::VarStore;
use tch::{Device, Kind};

const HH_FILE: &str = "../shared/data/hh-rlhf/helpful-base-test.jsonl.gz";
const WARMUP: usize = 1;

struct Settings {
    root: PathBuf,
    hh_file: PathBuf,
    limits: Limits,
    threads: i32,
    steps: usize,
    device: Device,
    bf16: bool,
    baselines: bool,
    length_buckets: usize,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn settings() -> Settings {
    let device = match env_or("REBELD_BENCH_DEVICE", "cpu").as_str() {
        "cuda" => Device::Cuda(0),
        _ => Device::Cpu,
    };
    let root = PathBuf::from(env_or("REBELD_BENCH_ROOT", env!("CARGO_MANIFEST_DIR")));
    Settings {
        hh_file: root.join(env_or("REBELD_BENCH_HH", HH_FILE)),
        root,
        limits: Limits {
            max_prompt_tokens: env_or("REBELD_BENCH_PROMPT_TOKENS", "48")
                .parse()
                .expect("n"),
            max_response_tokens: env_or("REBELD_BENCH_RESPONSE_TOKENS", "24")
                .parse()
                .expect("n"),
        },
        threads: env_or("REBELD_BENCH_THREADS", "2")
            .parse()
            .expect("threads"),
        steps: env_or("REBELD_BENCH_STEPS", "3").parse().expect("steps"),
        device,
        bf16: env_or("REBELD_BENCH_BF16", "0") == "1",
        baselines: env_or("REBELD_BENCH_BASELINES", "1") == "1",
        length_buckets: env_or("REBELD_BENCH_LENGTH_BUCKETS", "1")
            .parse()
            .expect("length buckets"),
    }
}

/// The first `count` HH-RLHF pairs whose prompt fits in the limits, chosen as A.
fn hh_pairs(
    tokenizer: &PolicyTokenizer,
    count: usize,
    settings: &Settings,
) -> Vec<(Sequence, Sequence, f64)> {
    let (path, limits) = (&settings.hh_file, settings.limits);
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let rewards = RewardSpec::from_config(&TrainConfig::default());
    let labels = PairRecord {
        preference: Some(Preference::A),
        ..PairRecord::default()
    };
    let reward_diff = rewards.reward_difference(&labels).expect("a preference");
    let mut pairs = Vec::new();
    for line in BufReader::new(flate2::read::GzDecoder::new(file)).lines() {
        let record: Value = serde_json::from_str(&line.expect("line")).expect("HH line");
        let (Some(chosen), Some(rejected)) =
            (record["chosen"].as_str(), record["rejected"].as_str())
        else {
            continue;
        };
        let Ok(split) = split_dialogues(chosen, rejected) else {
            continue;
        };
        let prompt = tokenizer
            .encode_prompt(&Content::Messages(split.prompt))
            .expect("prompt");
        if prompt.len() > limits.max_prompt_tokens {
            continue;
        }
        let encode = |text: String| {
            let ids = tokenizer
                .encode_response(&Content::Text(text))
                .expect("response");
            let cut = ids.len() > limits.max_response_tokens;
            Sequence::new(&prompt, &ids, cut, tokenizer.eos_id(), limits)
        };
        if let (Ok(a), Ok(b)) = (encode(split.chosen), encode(split.rejected)) {
            pairs.push((a, b, reward_diff));
        }
        if pairs.len() == count {
            return pairs;
        }
    }
    panic!("not enough short HH-RLHF pairs in {path:?}");
}

fn load(dir: &Path, settings: &Settings) -> (VarStore, Llama) {
    let mut vs = VarStore::new(settings.device);
    if settings.bf16 {
        vs.set_kind(Kind::BFloat16);
    }
    let model = Llama::from_pretrained(&vs, dir).expect("model loads");
    (vs, model)
}

fn train_config(pairs: usize, length_buckets: usize) -> TrainConfig {
    TrainConfig {
        objective: Objective::Chi2,
        radius: 0.1,
        learning_rate: 1e-6,
        warmup_steps: 0,
        batch_size: pairs,
        micro_batch_size: pairs,
        length_buckets,
        ..TrainConfig::default()
    }
}

/// The batch file the Python baselines read.
fn batch_json(dir: &Path, pad_id: u32, config: &TrainConfig, pairs: &[TrainPair]) -> Value {
    let ids = |s: &Sequence| s.ids().to_vec();
    json!({
        "model_dir": dir,
        "pad_id": pad_id,
        "scratch": std::env::temp_dir().join("rebeld-bench-trl"),
        "config": {
            "eta": config.eta, "radius": config.radius, "learning_rate": config.learning_rate,
            "weight_decay": config.weight_decay, "max_grad_norm": config.max_grad_norm,
        },
        "pairs": pairs.iter().map(|p| json!({
            "a_ids": ids(&p.a), "a_prompt_len": p.a.prompt_len(),
            "b_ids": ids(&p.b), "b_prompt_len": p.b.prompt_len(),
            "anchor_a": p.anchor_a, "anchor_b": p.anchor_b, "reward_diff": p.reward_diff,
        })).collect::<Vec<_>>(),
    })
}

struct Measured {
    median_s: f64,
    first_losses: Vec<f64>,
    tokens: usize,
    padded_tokens: usize,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn rebeld_steps(
    dir: &Path,
    n_pairs: usize,
    length_buckets: usize,
    settings: &Settings,
) -> (Measured, Value) {
    let tokenizer = PolicyTokenizer::from_dir(dir).expect("tokenizer");
    let pad_id = tokenizer.pad_id();
    let raw = hh_pairs(&tokenizer, n_pairs, settings);
    let (vs, policy) = load(dir, settings);
    let anchors = {
        let (_anchor_vs, anchor) = load(dir, settings);
        let seqs: Vec<_> = raw.iter().map(|(a, b, _)| (a.clone(), b.clone())).collect();
        pair_logprobs(&anchor, &seqs, pad_id, n_pairs, settings.device).expect("anchor")
    };
    let pairs: Vec<TrainPair> = raw
        .into_iter()
        .zip(anchors)
        .map(|((a, b, reward_diff), (anchor_a, anchor_b))| TrainPair {
            a,
            b,
            anchor_a,
            anchor_b,
            reference: None,
            reward_diff,
        })
        .collect();
    let config = train_config(n_pairs, length_buckets);
    let step_config = StepConfig::from_config(&config, pad_id).expect("step config");
    let mut trainer = Trainer::new(&vs, step_config).expect("trainer");
    let mut seconds = Vec::new();
    let (mut tokens, mut first_losses) = (0, Vec::new());
    for step in 0..WARMUP + settings.steps {
        let started = Instant::now();
        let report = trainer.step(&policy, &pairs).expect("step");
        if settings.device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        assert!(!report.is_skipped(), "{report:?}");
        tokens = report.tokens;
        if step == 0 {
            first_losses = report.losses;
        }
        if step >= WARMUP {
            seconds.push(started.elapsed().as_secs_f64());
        }
    }
    let lengths: Vec<usize> = pairs
        .iter()
        .flat_map(|p| [p.a.ids().len(), p.b.ids().len()])
        .collect();
    let measured = Measured {
        median_s: median(seconds),
        first_losses,
        tokens,
        padded_tokens: padded_tokens(&lengths, length_buckets),
    };
    (measured, batch_json(dir, pad_id, &config, &pairs))
}

/// Runs `benches/train_step.py` on `batch`; its last stdout line is a JSON object.
fn baselines(name: &str, batch: &Value, settings: &Settings) -> Value {
    let file = std::env::temp_dir().join(format!("rebeld-bench-train-{name}.json"));
    std::fs::write(&file, batch.to_string()).expect("write the batch file");
    let output = Command::new("python")
        .arg(settings.root.join("benches/train_step.py"))
        .arg(&file)
        .args(["--steps", &settings.steps.to_string()])
        .args(["--warmup", &WARMUP.to_string()])
        .args(["--threads", &settings.threads.to_string()])
        .output()
        .expect("python runs (source scripts/env.sh)");
    match std::env::var_os("REBELD_BENCH_KEEP_BATCH") {
        // Kept for `python benches/train_step.py FILE --profile`.
        Some(_) => eprintln!("batch kept in {}", file.display()),
        // Best effort: a leftover file in the temp folder is harmless.
        None => {
            let _ = std::fs::remove_file(&file);
        }
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|_| {
        panic!(
            "train_step.py failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn row(label: &str, m: &Measured, rebeld_rate: f64) {
    let rate = m.tokens as f64 / m.median_s;
    println!(
        "| {label} | {:.3} | {} | {} | {:.0} | {:.2}x |",
        m.median_s,
        m.tokens,
        m.padded_tokens,
        rate,
        rebeld_rate / rate
    );
}

fn from_python(value: &Value, tokens: usize) -> Option<Measured> {
    Some(Measured {
        median_s: value["median_s"].as_f64()?,
        first_losses: value["first_losses"]
            .as_array()
            .map(|l| l.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default(),
        tokens: value["tokens"].as_u64().map_or(tokens, |t| t as usize),
        padded_tokens: value["padded_tokens"].as_u64()? as usize,
    })
}

fn bench_model(name: &str, dir: &Path, n_pairs: usize, settings: &Settings) {
    let (ours, batch) = rebeld_steps(dir, n_pairs, 1, settings);
    let bucketed = (settings.length_buckets > 1)
        .then(|| rebeld_steps(dir, n_pairs, settings.length_buckets, settings).0);
    let rate = ours.tokens as f64 / ours.median_s;
    println!(
        "\n{name}: {n_pairs} pairs per step, median of {} steps",
        settings.steps
    );
    println!("\n| step | median s | tokens | padded tokens | tokens/s | rebeld's ratio |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    row("rebeld chi2-REBEL", &ours, rate);
    if let Some(m) = &bucketed {
        let label = format!(
            "rebeld chi2-REBEL, ≤ {} length buckets",
            settings.length_buckets
        );
        row(&label, m, rate);
    }
    if !settings.baselines {
        return;
    }
    let result = baselines(name, &batch, settings);
    let torch = from_python(&result["torch"], ours.tokens);
    match &torch {
        Some(m) => row("PyTorch chi2-REBEL (same step)", m, rate),
        None => println!("| PyTorch chi2-REBEL | failed: {} |", result["torch"]),
    }
    let trl = from_python(&result["trl"], ours.tokens);
    match &trl {
        Some(m) => row("TRL DPOTrainer step", m, rate),
        None => println!(
            "| TRL DPOTrainer step | failed: {} |",
            result["trl"]["error"]
        ),
    }
    if let Some(b) = &bucketed {
        let speedup = |m: &Measured| m.median_s / b.median_s;
        let against = |m: &Option<Measured>| m.as_ref().map_or(f64::NAN, speedup);
        println!(
            "\nlength-bucketed rebeld against TRL (padded to the longest): {:.2}x; against \
             the padded PyTorch step: {:.2}x",
            against(&trl),
            against(&torch)
        );
    }
    if let Some(m) = torch {
        let gap = ours
            .first_losses
            .iter()
            .zip(&m.first_losses)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let compared = ours.first_losses.len().min(m.first_losses.len());
        println!(
            "\nsame step check: largest gap between the first step's losses, over {compared} \
             pairs: {gap:.2e}"
        );
    }
    println!(
        "(torch {}, TRL {}, {} threads)",
        result["torch_version"], result["trl_version"], result["threads"]
    );
}

fn models(root: &Path) -> Vec<(String, PathBuf, usize)> {
    let default =
        "tiny-llama=tests/fixtures/tiny-llama:8,smollm2-135m=models/smollm2-135m-instruct:4";
    env_or("REBELD_BENCH_MODELS", default)
        .split(',')
        .map(|spec| {
            let (name, rest) = spec.split_once('=').expect("name=folder:pairs");
            let (dir, pairs) = rest.rsplit_once(':').expect("folder:pairs");
            (
                name.to_owned(),
                root.join(dir),
                pairs.parse().expect("pairs"),
            )
        })
        .collect()
}

fn main() {
    let settings = settings();
    tch::set_num_threads(settings.threads);
    println!(
        "device {:?}, {} threads, bf16 {}, prompts ≤ {} tokens, responses ≤ {}",
        settings.device,
        settings.threads,
        settings.bf16,
        settings.limits.max_prompt_tokens,
        settings.limits.max_response_tokens
    );
    for (name, dir, pairs) in models(&settings.root) {
        bench_model(&name, &dir, pairs, &settings);
    }
}
