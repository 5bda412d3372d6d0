//! The real policy: SmolLM2-135M-Instruct imported from its GGUF file by `rebeld import gguf`
//! (`scripts/fetch-model`, which `scripts/test` runs first), checked against `transformers`
//! loading the same GGUF file (`tests/fixtures/smollm2_reference.py`) on HH-RLHF pairs:
//! chat-template rendering, token ids, response log-probability sums within 1e-3, and greedy
//! answers (KV cache on rebeld's side) token for token.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;

use rebeld::event::hh_rlhf::{split_dialogues, HhSplit};
use rebeld::event::{Content, Turn};
use rebeld::model::generate::{generate_ids, Sampling};
use rebeld::model::llama::Llama;
use rebeld::model::logprobs::{response_logprobs_no_grad, Batch, Limits, Sequence};
use rebeld::model::tokenizer::PolicyTokenizer;
use rebeld::model::weights::SaveDtype;
use serde_json::{json, Value};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BINARY: &str = env!("CARGO_BIN_EXE_rebeld");
const GGUF: &str = "models/.cache/SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL: &str = "models/smollm2-135m-instruct";
/// HH-RLHF files, shared beside the repository and never copied into it.
const HH_DIR: &str = "../shared/data/hh-rlhf";
/// Pairs compared, taken from each of these files.
const PAIRS_PER_FILE: usize = 10;
const HH_FILES: [&str; 2] = ["harmless-base-test.jsonl.gz", "helpful-base-test.jsonl.gz"];
/// Prompts answered by greedy decoding on both sides.
const QUESTIONS: [&str; 2] = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
];
/// New tokens per greedy answer.
const GREEDY_TOKENS: usize = 24;
/// Pairs whose prompt is longer are skipped, to keep the test short on two CPU cores.
const MAX_PROMPT_TOKENS: usize = 96;
/// Responses are cut here (and then scored without EOS); both sides score the same ids.
const LIMITS: Limits = Limits {
    max_prompt_tokens: MAX_PROMPT_TOKENS,
    max_response_tokens: 48,
};

fn root() -> PathBuf {
    PathBuf::from(ROOT)
}

/// The imported model folder and its GGUF file; a clear failure when they are absent.
fn model_paths() -> (PathBuf, PathBuf) {
    let (model, gguf) = (root().join(MODEL), root().join(GGUF));
    assert!(
        model.join("model.safetensors").is_file() && gguf.is_file(),
        "{} or {} is missing: run scripts/fetch-model",
        model.display(),
        gguf.display()
    );
    (model, gguf)
}

fn python() -> PathBuf {
    let python = root().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/setup",
        python.display()
    );
    python
}

/// Runs a fixture script with a JSON request; returns its JSON response.
fn run_script(script: &str, request: &Value) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, output) = (
        dir.path().join("request.json"),
        dir.path().join("response.json"),
    );
    std::fs::write(&input, request.to_string()).expect("write the request");
    let status = Command::new(python())
        .arg(root().join("tests/fixtures").join(script))
        .arg(&input)
        .arg(&output)
        .status()
        .expect("python runs");
    assert!(status.success(), "{script} failed: {status}");
    serde_json::from_str(&std::fs::read_to_string(&output).expect("response")).expect("JSON")
}

/// The first pairs of each HH-RLHF file that split into a shared prompt and two responses and
/// whose prompt encodes to at most [`MAX_PROMPT_TOKENS`].
fn hh_pairs(tokenizer: &PolicyTokenizer) -> Vec<HhSplit> {
    let mut pairs = Vec::new();
    for name in HH_FILES {
        let path = root().join(HH_DIR).join(name);
        let file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (the shared HH-RLHF data)", path.display()));
        let lines = BufReader::new(flate2::read::GzDecoder::new(file)).lines();
        let splits = lines.map_while(Result::ok).filter_map(|line| {
            let record: Value = serde_json::from_str(&line).ok()?;
            split_dialogues(record["chosen"].as_str()?, record["rejected"].as_str()?).ok()
        });
        let short = splits.filter(|pair| {
            let prompt = Content::Messages(pair.prompt.clone());
            let ids = tokenizer.encode_prompt(&prompt).expect("prompt");
            ids.len() <= MAX_PROMPT_TOKENS
        });
        pairs.extend(short.take(PAIRS_PER_FILE));
    }
    assert_eq!(pairs.len(), PAIRS_PER_FILE * HH_FILES.len());
    pairs
}

fn turns_json(turns: &[Turn]) -> Value {
    let turns: Vec<Value> = turns
        .iter()
        .map(|t| json!({"role": t.role.as_str(), "content": t.content}))
        .collect();
    Value::Array(turns)
}

fn ids_of(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).expect("a list of ids")
}

fn load(dir: &Path) -> (VarStore, Llama) {
    let vs = VarStore::new(Device::Cpu);
    let model = Llama::from_pretrained(&vs, dir).expect("the model loads");
    (vs, model)
}

/// Response log-prob sums of `sequences`, scored in padded batches of 8.
fn rebeld_sums(model: &Llama, sequences: &[Sequence], pad_id: u32) -> Vec<f64> {
    let mut sums = Vec::new();
    for chunk in sequences.chunks(8) {
        let batch = Batch::new(chunk, pad_id, Device::Cpu).expect("batch");
        let scored = response_logprobs_no_grad(model, &batch).expect("score");
        sums.extend(Vec::<f64>::try_from(scored.sums.to_kind(Kind::Double)).expect("sums"));
    }
    sums
}

#[test]
fn imported_smollm2_matches_transformers_on_hh_rlhf_pairs() {
    let (dir, gguf) = model_paths();
    let tokenizer = PolicyTokenizer::from_dir(&dir).expect("tokenizer");
    let pairs = hh_pairs(&tokenizer);

    let mut sequences = Vec::new();
    let mut responses = Vec::new();
    let mut prompts = Vec::new();
    for pair in &pairs {
        let prompt = tokenizer
            .encode_prompt(&Content::Messages(pair.prompt.clone()))
            .expect("prompt");
        prompts.push(prompt.clone());
        for text in [&pair.chosen, &pair.rejected] {
            let response = tokenizer
                .encode_response(&Content::Text(text.clone()))
                .expect("response");
            let eos = tokenizer.eos_id();
            let sequence = Sequence::new(&prompt, &response, false, eos, LIMITS).expect("seq");
            sequences.push(sequence);
            responses.push((text.clone(), response));
        }
    }
    let questions: Vec<Vec<u32>> = QUESTIONS
        .iter()
        .map(|q| {
            tokenizer
                .encode_prompt(&Content::Text(q.to_string()))
                .expect("prompt")
        })
        .collect();
    let greedy: Vec<Value> = questions
        .iter()
        .map(|ids| {
            json!({"prompt_ids": ids, "max_new_tokens": GREEDY_TOKENS,
                   "eos_ids": tokenizer.eos_ids()})
        })
        .collect();
    let request = json!({
        "gguf": gguf,
        "greedy": greedy,
        "conversations": pairs.iter().map(|p| turns_json(&p.prompt)).collect::<Vec<_>>(),
        "texts": responses.iter().map(|(text, _)| text).collect::<Vec<_>>(),
        "sequences": sequences.iter().map(|s| json!({
            "ids": s.ids(), "prompt_len": s.prompt_len(),
        })).collect::<Vec<_>>(),
    });
    let reference = run_script("smollm2_reference.py", &request);

    for (i, pair) in pairs.iter().enumerate() {
        let rendered = tokenizer
            .render_prompt(&Content::Messages(pair.prompt.clone()))
            .expect("render");
        assert_eq!(rendered, reference["rendered"][i], "rendering of pair {i}");
        assert_eq!(
            prompts[i],
            ids_of(&reference["prompt_ids"][i]),
            "prompt ids of pair {i}"
        );
    }
    for (i, (text, ids)) in responses.iter().enumerate() {
        assert_eq!(*ids, ids_of(&reference["text_ids"][i]), "ids of {text:?}");
    }

    let (_vs, model) = load(&dir);
    let found = rebeld_sums(&model, &sequences, tokenizer.pad_id());
    let expected: Vec<f64> = serde_json::from_value(reference["sums"].clone()).expect("sums");
    assert_eq!(found.len(), expected.len());
    for (i, (f, e)) in found.iter().zip(&expected).enumerate() {
        assert!(
            (f - e).abs() <= 1e-3,
            "sequence {i}: rebeld {f}, transformers {e}"
        );
    }
    for (i, prompt) in questions.iter().enumerate() {
        let sampling = Sampling::greedy(GREEDY_TOKENS);
        let found = generate_ids(&model, prompt, tokenizer.eos_ids(), &sampling).expect("gen");
        let expected = ids_of(&reference["greedy"][i]);
        assert_eq!(found.ids, expected, "greedy answer to {:?}", QUESTIONS[i]);
        assert!(
            found.ids.len() >= 5,
            "{:?} answered with {:?}",
            QUESTIONS[i],
            found.ids
        );
    }
    // The pairs are real text: the scores must spread, or the comparison shows nothing.
    let spread = expected.iter().cloned().fold(f64::MIN, f64::max)
        - expected.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 10.0, "log-prob sums spread only {spread}");
}

#[test]
fn generate_answers_the_capital_of_france() {
    let (dir, _gguf) = model_paths();
    let output = Command::new(BINARY)
        .args(["generate", "--model"])
        .arg(&dir)
        .args([
            "--prompt",
            "What is the capital of France?",
            "--max-new-tokens",
            "32",
        ])
        .output()
        .expect("rebeld runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.contains("Paris"), "{stdout}");
}

#[test]
fn a_perturbed_smollm2_saved_in_bf16_loads_in_transformers_with_the_same_logits() {
    let (dir, _gguf) = model_paths();
    let (vs, model) = load(&dir);
    tch::no_grad(|| {
        for (_, mut var) in vs.variables() {
            let noise = var.randn_like() * 1e-2;
            let _ = var.g_add_(&noise);
        }
    });
    let out = tempfile::tempdir().expect("tempdir");
    model
        .save_pretrained(&vs, out.path(), SaveDtype::BF16)
        .expect("save");
    let ids: Vec<i64> = vec![
        1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520,
    ];
    let expected = run_script(
        "logits_of_folder.py",
        &json!({"folder": out.path(), "ids": ids}),
    );
    let expected: Vec<Vec<f64>> = serde_json::from_value(expected["logits"].clone()).expect("rows");

    // Loaded back from the bf16 file, rebeld runs the very weights transformers runs.
    let (_vs, reloaded) = load(out.path());
    let input = Tensor::from_slice(&ids).reshape([1, -1]);
    let found = tch::no_grad(|| reloaded.forward(&input, None)).expect("forward");
    let found: Vec<Vec<f64>> =
        Vec::<Vec<f64>>::try_from(found.squeeze_dim(0).to_kind(Kind::Double)).expect("rows");
    let mut worst = 0.0f64;
    for (f_row, e_row) in found.iter().zip(&expected) {
        for (f, e) in f_row.iter().zip(e_row) {
            worst = worst.max((f - e).abs() / e.abs().max(1.0));
        }
    }
    assert!(worst < 1e-3, "logits differ by {worst} (relative)");
    assert_eq!(found.len(), ids.len());
}
