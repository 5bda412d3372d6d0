//! DRO-REBEL on the real policy: twenty chi-squared steps of SmolLM2-135M-Instruct on CPU over
//! HH-RLHF pairs lower the mean training loss, and the implicit-reward accuracy on pairs not
//! trained on is measured and reported.
//!
//! Kept small for two CPU cores: prompts of at most 48 tokens, responses cut at 24, eight
//! training pairs stepped four at a time.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use rebeld::buffer::{PairRecord, Preference};
use rebeld::config::{Objective, TrainConfig};
use rebeld::event::hh_rlhf::split_dialogues;
use rebeld::event::Content;
use rebeld::model::llama::Llama;
use rebeld::model::logprobs::{Limits, Sequence};
use rebeld::model::tokenizer::PolicyTokenizer;
use rebeld::train::gates::implicit_reward;
use rebeld::train::reward::RewardSpec;
use rebeld::train::step::{pair_logprobs, StepConfig, TrainPair, Trainer};
use serde_json::Value;
use tch::nn::VarStore;
use tch::Device;

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/smollm2-135m-instruct");
const HH_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/hh-rlhf/helpful-base-test.jsonl.gz"
);
const LIMITS: Limits = Limits {
    max_prompt_tokens: 48,
    max_response_tokens: 24,
};
const TRAIN_PAIRS: usize = 8;
const HELD_OUT_PAIRS: usize = 16;
const STEP_PAIRS: usize = 4;
const STEPS: usize = 20;

/// A scored pair: chosen as A, rejected as B, with the users' reward difference.
struct Pair {
    a: Sequence,
    b: Sequence,
    reward_diff: f64,
}

/// The first HH-RLHF pairs whose whole prompt fits in [`LIMITS`].
fn hh_pairs(tokenizer: &PolicyTokenizer, rewards: &RewardSpec, count: usize) -> Vec<Pair> {
    let file = std::fs::File::open(HH_FILE)
        .unwrap_or_else(|e| panic!("{HH_FILE}: {e} (the shared HH-RLHF data)"));
    let lines = BufReader::new(flate2::read::GzDecoder::new(file)).lines();
    let mut pairs = Vec::new();
    for line in lines.map_while(Result::ok) {
        let record: Value = serde_json::from_str(&line).expect("HH line");
        let (Some(chosen), Some(rejected)) =
            (record["chosen"].as_str(), record["rejected"].as_str())
        else {
            continue;
        };
        let Ok(split) = split_dialogues(chosen, rejected) else {
            continue;
        };
        let prompt = tokenizer
            .encode_prompt(&Content::Messages(split.prompt.clone()))
            .expect("prompt");
        if prompt.len() > LIMITS.max_prompt_tokens {
            continue;
        }
        let encode = |text: &str| {
            let ids = tokenizer
                .encode_response(&Content::Text(text.to_owned()))
                .expect("response");
            let truncated = ids.len() > LIMITS.max_response_tokens;
            Sequence::new(&prompt, &ids, truncated, tokenizer.eos_id(), LIMITS)
        };
        let (Ok(a), Ok(b)) = (encode(&split.chosen), encode(&split.rejected)) else {
            continue;
        };
        let labels = PairRecord {
            preference: Some(Preference::A),
            ..PairRecord::default()
        };
        let reward_diff = rewards.reward_difference(&labels).expect("a preference");
        pairs.push(Pair { a, b, reward_diff });
        if pairs.len() == count {
            break;
        }
    }
    assert_eq!(pairs.len(), count, "not enough short HH-RLHF pairs");
    pairs
}

fn load() -> (VarStore, Llama) {
    let dir = PathBuf::from(MODEL);
    assert!(
        dir.join("model.safetensors").is_file(),
        "{MODEL} is missing: run scripts/fetch-model"
    );
    let vs = VarStore::new(Device::Cpu);
    let model = Llama::from_pretrained(&vs, &dir).expect("SmolLM2 loads");
    (vs, model)
}

fn logprobs(model: &Llama, pairs: &[Pair], pad_id: u32) -> Vec<(f64, f64)> {
    let sequences: Vec<(Sequence, Sequence)> =
        pairs.iter().map(|p| (p.a.clone(), p.b.clone())).collect();
    pair_logprobs(model, &sequences, pad_id, 8, Device::Cpu).expect("log-probs")
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

#[test]
fn twenty_chi2_steps_on_smollm2_lower_the_training_loss() {
    let tokenizer = PolicyTokenizer::from_dir(&PathBuf::from(MODEL)).expect("tokenizer");
    let config = TrainConfig {
        objective: Objective::Chi2,
        radius: 0.1,
        learning_rate: 1e-6,
        warmup_steps: 0,
        batch_size: STEP_PAIRS,
        micro_batch_size: STEP_PAIRS,
        ..TrainConfig::default()
    };
    let rewards = RewardSpec::from_config(&config);
    let mut pairs = hh_pairs(&tokenizer, &rewards, TRAIN_PAIRS + HELD_OUT_PAIRS);
    let held_out = pairs.split_off(TRAIN_PAIRS);

    let (vs, policy) = load();
    let (_anchor_vs, anchor) = load();
    let pad_id = tokenizer.pad_id();
    let anchored = logprobs(&anchor, &pairs, pad_id);
    let train: Vec<TrainPair> = pairs
        .iter()
        .zip(&anchored)
        .map(|(pair, &(anchor_a, anchor_b))| TrainPair {
            a: pair.a.clone(),
            b: pair.b.clone(),
            anchor_a,
            anchor_b,
            reference: None,
            reward_diff: pair.reward_diff,
        })
        .collect();

    let step_config = StepConfig::from_config(&config, pad_id).expect("step config");
    let mut trainer = Trainer::new(&vs, step_config).expect("trainer");
    let before = mean(&trainer.losses(&policy, &train).expect("losses"));
    for step in 0..STEPS {
        let start = (step * STEP_PAIRS) % TRAIN_PAIRS;
        let report = trainer
            .step(&policy, &train[start..start + STEP_PAIRS])
            .expect("step");
        assert!(!report.is_skipped(), "step {step}: {report:?}");
    }
    let after = mean(&trainer.losses(&policy, &train).expect("losses"));
    eprintln!("mean training loss over {TRAIN_PAIRS} pairs: {before:.4} before, {after:.4} after");
    assert!(
        after < before,
        "{STEPS} steps must lower the loss: {before} -> {after}"
    );

    let diffs: Vec<f64> = held_out.iter().map(|p| p.reward_diff).collect();
    let reference = logprobs(&anchor, &held_out, pad_id);
    let trained = implicit_reward(&logprobs(&policy, &held_out, pad_id), &reference, &diffs)
        .expect("held-out pairs with a preference");
    eprintln!(
        "implicit-reward accuracy on {} held-out pairs: {:.3} (mean margin {:.4})",
        trained.pairs, trained.accuracy, trained.mean_margin
    );
    assert_eq!(trained.pairs, HELD_OUT_PAIRS);
    assert!(trained.accuracy.is_finite() && trained.mean_margin.is_finite());
}
