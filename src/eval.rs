//! `rebeld eval`: implicit-reward accuracy of a policy against a reference on held-out pairs.
//!
//! For each pair with a stated preference (not a tie), with `c` the chosen and `r` the
//! rejected response, the implicit reward margin is
//!
//! ```text
//! m = [log π(c) − log π_ref(c)] − [log π(r) − log π_ref(r)]
//! ```
//!
//! (log-probs of the whole response given the prompt, EOS included unless truncated, as in
//! training). The accuracy is the share of pairs with `m > 0`, a tie (`m = 0`, as for the
//! reference itself) counting one half; the mean margin is reported
//! beside it. Lines are rebeld v1 events or TRL records (see the README), plain or gzipped;
//! lines that do not parse, ties, and pairs without a preference are counted as skipped.
//!
//! [`evaluate_by_segment`] reports the same figures for each segment of the pairs (named files,
//! or the `segment` tags of one file), the overall ones and the worst segment.
//!
//! Several policies (the versions of one run, say) can be evaluated in one call: the pairs
//! are read once and the reference is scored once, so each further policy costs one pass
//! instead of two.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::nn::VarStore;
use tch::Device;

use crate::buffer::{PairRecord, Preference};
use crate::config::PromptTooLong;
use crate::event::{parse_event, EventLimits};
use crate::ingest::convert::{ConvertSettings, Converter};
use crate::model::llama::{Llama, ModelError};
use crate::model::logprobs::{Limits, Sequence};
use crate::model::tokenizer::{PolicyTokenizer, TokenizerError};
use crate::replay::schedule::NamedFile;
use crate::replay::{event_value, open_lines, ReplayError, ReplayFormat};
use crate::train::gates::{implicit_reward, is_held_out};
use crate::train::segments::OTHER;
use crate::train::step::{pair_logprobs, pair_sequences, StepError};

pub mod segments;

use segments::{aggregate, ScoredPairs, SegmentedReport};

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A model folder could not be loaded.
    #[error("loading the model in {path:?}")]
    Model {
        /// The folder.
        path: PathBuf,
        /// The failure.
        #[source]
        source: ModelError,
    },
    /// Two evaluated policies tokenize differently, so one set of pairs cannot serve both.
    #[error("{other:?} has a tokenizer.json unlike that of {first:?}")]
    TokenizerMismatch {
        /// The first policy, whose tokenizer reads the pairs.
        first: PathBuf,
        /// The policy whose tokenizer differs.
        other: PathBuf,
    },
    /// No policy was named.
    #[error("no policy to evaluate")]
    NoPolicy,
    /// The policy's tokenizer could not be loaded.
    #[error("loading the tokenizer of {path:?}")]
    Tokenizer {
        /// The folder.
        path: PathBuf,
        /// The failure.
        #[source]
        source: TokenizerError,
    },
    /// The data file could not be read.
    #[error("reading the data file")]
    Data(#[from] ReplayError),
    /// A line could not be read.
    #[error("reading {path:?}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// Scoring failed.
    #[error("scoring pairs")]
    Score(#[from] StepError),
    /// No pair could be evaluated.
    #[error("no pair of {0:?} has a preference to evaluate")]
    NoPairs(PathBuf),
    /// No pair of any segment could be evaluated.
    #[error("no pair of any segment has a preference to evaluate")]
    NoSegmentPairs,
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The trained policies' folders, each reported on its own (the first one's tokenizer
    /// reads the pairs; every other must have the same `tokenizer.json`).
    pub models: Vec<PathBuf>,
    /// The reference model's folder.
    pub reference: PathBuf,
    /// JSONL or JSONL.gz of preference events.
    pub data: EvalData,
    /// Where to run.
    pub device: Device,
    /// Pairs scored per forward pass.
    pub batch_size: usize,
    /// Token limits, as in training.
    pub limits: Limits,
    /// Evaluate at most this many pairs (of each segment, by segment).
    pub limit: Option<usize>,
    /// How each line is read (HH-RLHF dialogues are converted as `rebeld replay` converts them).
    pub format: ReplayFormat,
    /// Keep only the events of the held-out slice of this share (`checkpoint.holdout_fraction`
    /// of the daemon that trained the model): pairs it never trained on.
    pub held_out: Option<f64>,
}

/// Where the pairs come from.
#[derive(Debug, Clone)]
pub enum EvalData {
    /// One file; by segment, its events' `segment` tags (untagged ones are `other`).
    File(PathBuf),
    /// Named files, one segment each, in order.
    Segments(Vec<NamedFile>),
}

/// The result.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Pairs evaluated.
    pub pairs: usize,
    /// Lines skipped: unparseable, ties, no preference, nothing to score.
    pub skipped: usize,
    /// Share of evaluated pairs whose margin is positive.
    pub accuracy: f64,
    /// Mean implicit reward margin.
    pub mean_margin: f64,
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "pairs {}", self.pairs)?;
        writeln!(f, "skipped {}", self.skipped)?;
        writeln!(f, "accuracy {:.6}", self.accuracy)?;
        write!(f, "mean_margin {:.6}", self.mean_margin)
    }
}

impl EvalReport {
    /// The report as JSON for scripts: `pairs`, `skipped`, `accuracy`, `mean_margin`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "pairs": self.pairs,
            "skipped": self.skipped,
            "accuracy": self.accuracy,
            "mean_margin": self.mean_margin,
        })
    }
}

/// Reads `options.data`, scores every usable pair under each policy and the reference, and
/// reports each policy (all segments together), in the order of `options.models`.
pub fn evaluate(options: &EvalOptions) -> Result<Vec<EvalReport>, EvalError> {
    let no_pairs = || match &options.data {
        EvalData::File(path) => EvalError::NoPairs(path.clone()),
        EvalData::Segments(_) => EvalError::NoSegmentPairs,
    };
    let (pairs, scored) = read_and_score(options, false)?;
    if pairs.pairs.is_empty() {
        return Err(no_pairs());
    }
    // Chosen first: the users' reward difference is positive for every pair.
    let chosen_first = vec![1.0; pairs.pairs.len()];
    let skipped = pairs.skipped.iter().sum();
    scored
        .policies
        .iter()
        .map(|policy| {
            let reward =
                implicit_reward(policy, &scored.reference, &chosen_first).ok_or_else(no_pairs)?;
            Ok(EvalReport {
                pairs: reward.pairs,
                skipped,
                accuracy: reward.accuracy,
                mean_margin: reward.mean_margin,
            })
        })
        .collect()
}

/// Reads `options.data`, scores every usable pair under each policy and the reference, and
/// reports each policy's figures by segment, the overall ones and the worst segment, in the
/// order of `options.models`.
pub fn evaluate_by_segment(options: &EvalOptions) -> Result<Vec<SegmentedReport>, EvalError> {
    let (pairs, scored) = read_and_score(options, true)?;
    scored
        .policies
        .iter()
        .map(|policy| {
            aggregate(ScoredPairs {
                labels: &pairs.labels,
                skipped: &pairs.skipped,
                segment_of: &pairs.segment_of,
                policy,
                reference: &scored.reference,
            })
            .ok_or(EvalError::NoSegmentPairs)
        })
        .collect()
}

/// The usable pairs of `options.data` and their scores under each policy and the reference;
/// the events of one file are told apart by their tags only `by_segment`.
fn read_and_score(options: &EvalOptions, by_segment: bool) -> Result<(Pairs, Scored), EvalError> {
    let first = options.models.first().ok_or(EvalError::NoPolicy)?;
    check_same_tokenizer(first, &options.models[1..])?;
    let tokenizer = PolicyTokenizer::from_dir(first).map_err(|source| EvalError::Tokenizer {
        path: first.clone(),
        source,
    })?;
    let pad_id = tokenizer.pad_id();
    let pairs = read_pairs(options, Arc::new(tokenizer), by_segment)?;
    if pairs.pairs.is_empty() {
        let nothing = Scored {
            policies: vec![Vec::new(); options.models.len()],
            reference: Vec::new(),
        };
        return Ok((pairs, nothing));
    }
    let scored = score(options, &pairs.pairs, pad_id)?;
    Ok((pairs, scored))
}

/// Fails unless every one of `others` has the same `tokenizer.json` bytes as `first`.
fn check_same_tokenizer(first: &Path, others: &[PathBuf]) -> Result<(), EvalError> {
    let read = |dir: &Path| {
        let path = dir.join("tokenizer.json");
        std::fs::read(&path).map_err(|source| EvalError::Read { path, source })
    };
    if others.is_empty() {
        return Ok(());
    }
    let expected = read(first)?;
    for other in others {
        if read(other)? != expected {
            return Err(EvalError::TokenizerMismatch {
                first: first.to_owned(),
                other: other.clone(),
            });
        }
    }
    Ok(())
}

/// The usable pairs of every input, each with its segment.
#[derive(Default)]
struct Pairs {
    /// `(chosen, rejected)` sequences.
    pairs: Vec<(Sequence, Sequence)>,
    /// The index in `labels` of each pair's segment.
    segment_of: Vec<usize>,
    /// The segments' names.
    labels: Vec<String>,
    /// Lines skipped in each segment.
    skipped: Vec<usize>,
    /// Pairs kept in each segment.
    kept: Vec<usize>,
}

impl Pairs {
    /// The index of segment `name`, added if new.
    fn segment(&mut self, name: &str) -> usize {
        match self.labels.iter().position(|label| label == name) {
            Some(index) => index,
            None => {
                self.labels.push(name.to_owned());
                self.skipped.push(0);
                self.kept.push(0);
                self.labels.len() - 1
            }
        }
    }
}

/// Reads every input of `options.data`.
fn read_pairs(
    options: &EvalOptions,
    tokenizer: Arc<PolicyTokenizer>,
    by_segment: bool,
) -> Result<Pairs, EvalError> {
    let reader = PairReader::new(options, tokenizer);
    let mut pairs = Pairs::default();
    match &options.data {
        EvalData::File(path) if by_segment => reader.read(path, None, &mut pairs)?,
        EvalData::File(path) => {
            let all = pairs.segment("all");
            reader.read(path, Some(all), &mut pairs)?;
        }
        EvalData::Segments(segments) => {
            for segment in segments {
                let index = pairs.segment(&segment.name);
                reader.read(&segment.path, Some(index), &mut pairs)?;
            }
        }
    }
    Ok(pairs)
}

/// Turns lines into `(chosen, rejected)` sequences as ingest tokenizes events.
struct PairReader<'a> {
    options: &'a EvalOptions,
    converter: Converter,
    eos_id: u32,
}

impl<'a> PairReader<'a> {
    fn new(options: &'a EvalOptions, tokenizer: Arc<PolicyTokenizer>) -> Self {
        let eos_id = tokenizer.eos_id();
        let converter = Converter::new(
            tokenizer,
            ConvertSettings {
                limits: EventLimits::default(),
                max_prompt_tokens: options.limits.max_prompt_tokens,
                max_response_tokens: options.limits.max_response_tokens,
                prompt_too_long: PromptTooLong::Truncate,
                keep_text: false,
            },
        );
        Self {
            options,
            converter,
            eos_id,
        }
    }

    /// Adds the usable pairs of `path` to `pairs`: all in segment `fixed` when given, else
    /// in the segment each event is tagged with.
    fn read(&self, path: &Path, fixed: Option<usize>, pairs: &mut Pairs) -> Result<(), EvalError> {
        let options = self.options;
        let full =
            |pairs: &Pairs, index: usize| options.limit.is_some_and(|n| pairs.kept[index] >= n);
        for line in open_lines(path)? {
            if fixed.is_some_and(|index| full(pairs, index)) {
                break;
            }
            let line = line.map_err(|source| EvalError::Read {
                path: path.to_owned(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let event = event_value(options.format, &line).ok().and_then(|value| {
                parse_event(Some(value.as_bytes()), &EventLimits::default()).ok()
            });
            let index = match fixed {
                Some(index) => index,
                None => pairs.segment(
                    event
                        .as_ref()
                        .and_then(|e| e.segment.as_deref())
                        .unwrap_or(OTHER),
                ),
            };
            if full(pairs, index) {
                continue;
            }
            let Some(event) = event else {
                pairs.skipped[index] += 1;
                continue;
            };
            if options
                .held_out
                .is_some_and(|fraction| !is_held_out(&event.id, fraction))
            {
                continue;
            }
            let record = self.converter.tokenize(&event).ok();
            match record.and_then(|r| chosen_first(&r, self.eos_id)) {
                Some(pair) => {
                    pairs.pairs.push(pair);
                    pairs.segment_of.push(index);
                    pairs.kept[index] += 1;
                }
                None => pairs.skipped[index] += 1,
            }
        }
        Ok(())
    }
}

/// The record's sequences with the chosen one first; `None` without a strict preference or
/// with nothing to score.
fn chosen_first(record: &PairRecord, eos_id: u32) -> Option<(Sequence, Sequence)> {
    let (a, b) = pair_sequences(record, eos_id, Limits::NONE).ok()?;
    match record.preference? {
        Preference::A => Some((a, b)),
        Preference::B => Some((b, a)),
        Preference::Tie => None,
    }
}

/// `(log π(chosen), log π(rejected))` of every pair under each policy and the reference.
struct Scored {
    /// One list per policy, in the order of `EvalOptions::models`.
    policies: Vec<Vec<(f64, f64)>>,
    /// The reference's, scored once for all policies.
    reference: Vec<(f64, f64)>,
}

/// Every `(chosen, rejected)` pair scored under each policy and the reference, one model in
/// memory at a time.
fn score(
    options: &EvalOptions,
    pairs: &[(Sequence, Sequence)],
    pad_id: u32,
) -> Result<Scored, EvalError> {
    let logprobs = |dir: &Path| -> Result<Vec<(f64, f64)>, EvalError> {
        let vs = VarStore::new(options.device);
        let model = Llama::from_pretrained(&vs, dir).map_err(|source| EvalError::Model {
            path: dir.to_owned(),
            source,
        })?;
        Ok(pair_logprobs(
            &model,
            pairs,
            pad_id,
            options.batch_size,
            options.device,
        )?)
    };
    let reference = logprobs(&options.reference)?;
    let policies = options
        .models
        .iter()
        .map(|dir| logprobs(dir))
        .collect::<Result<_, _>>()?;
    Ok(Scored {
        policies,
        reference,
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;
    use crate::model::weights::SaveDtype;

    #[derive(Deserialize)]
    struct Expected {
        norm_scale: f64,
        pairs: usize,
        skipped: usize,
        accuracy: f64,
        mean_margin: f64,
    }

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    fn expected() -> Expected {
        let text = std::fs::read_to_string(fixtures().join("eval/expected.json"))
            .expect("run make_eval_reference.py");
        serde_json::from_str(&text).expect("expected.json")
    }

    /// The fixture with its final norm scaled, saved with its tokenizer into `dir`.
    fn sharpened_policy(dir: &Path, scale: f64) {
        let tiny = fixtures().join("tiny-llama");
        let vs = VarStore::new(Device::Cpu);
        let model = Llama::from_pretrained(&vs, &tiny).expect("fixture");
        tch::no_grad(|| {
            let mut norm = vs.variables()["model.norm.weight"].shallow_clone();
            let _ = norm.g_mul_scalar_(scale);
        });
        model
            .save_pretrained(&vs, dir, SaveDtype::F32)
            .expect("save");
        for file in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            std::fs::copy(tiny.join(file), dir.join(file)).expect("copy");
        }
    }

    /// The report of the only policy of `options`.
    fn evaluate_one(options: &EvalOptions) -> EvalReport {
        let mut reports = evaluate(options).expect("evaluate");
        assert_eq!(reports.len(), 1);
        reports.remove(0)
    }

    fn options(model: PathBuf, reference: PathBuf, batch_size: usize) -> EvalOptions {
        EvalOptions {
            models: vec![model],
            reference,
            data: EvalData::File(fixtures().join("eval/pairs.jsonl")),
            device: Device::Cpu,
            batch_size,
            limits: Limits {
                max_prompt_tokens: 512,
                max_response_tokens: 256,
            },
            limit: None,
            format: ReplayFormat::Rebeld,
            held_out: None,
        }
    }

    #[test]
    fn held_out_keeps_only_the_slice_the_daemon_never_trains_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("pairs.jsonl");
        let lines: Vec<String> = (0..40)
            .map(|i| {
                serde_json::json!({
                    "prompt": format!("Question {i}?"),
                    "chosen": format!("Answer {i}."),
                    "rejected": "No.",
                })
                .to_string()
            })
            .collect();
        std::fs::write(&data, lines.join("\n")).expect("data");
        let held = lines
            .iter()
            .filter_map(|line| parse_event(Some(line.as_bytes()), &EventLimits::default()).ok())
            .filter(|event| is_held_out(&event.id, 0.5))
            .count();
        assert!(held > 0 && held < lines.len(), "{held}");

        let tiny = fixtures().join("tiny-llama");
        let run = |held_out| {
            let options = EvalOptions {
                data: EvalData::File(data.clone()),
                format: ReplayFormat::Trl,
                held_out,
                ..options(tiny.clone(), tiny.clone(), 8)
            };
            evaluate_one(&options)
        };
        assert_eq!(run(None).pairs, lines.len());
        assert_eq!(run(Some(1.0)).pairs, lines.len());
        assert_eq!(run(Some(0.5)).pairs, held);
    }

    #[test]
    fn accuracy_and_margin_match_transformers() {
        let want = expected();
        let dir = tempfile::tempdir().expect("tempdir");
        sharpened_policy(dir.path(), want.norm_scale);
        let tiny = fixtures().join("tiny-llama");
        for batch_size in [1, 4] {
            let found = evaluate_one(&options(dir.path().to_owned(), tiny.clone(), batch_size));
            assert_eq!(found.pairs, want.pairs);
            assert_eq!(found.skipped, want.skipped);
            assert!((found.accuracy - want.accuracy).abs() < 1e-12, "{found:?}");
            assert!(
                (found.mean_margin - want.mean_margin).abs() < 1e-4,
                "{} vs {}",
                found.mean_margin,
                want.mean_margin
            );
        }
        // Swapping the models negates every margin.
        let swapped = evaluate_one(&options(tiny, dir.path().to_owned(), 4));
        assert!((swapped.mean_margin + want.mean_margin).abs() < 1e-4);
        assert!((swapped.accuracy - (1.0 - want.accuracy)).abs() < 1e-12);
    }

    #[test]
    fn a_model_against_itself_has_no_margin() {
        let tiny = fixtures().join("tiny-llama");
        let found = evaluate_one(&options(tiny.clone(), tiny, 3));
        assert_eq!(found.accuracy, 0.5, "every pair is a tie");
        assert_eq!(found.mean_margin, 0.0);
    }

    #[test]
    fn several_policies_in_one_call_match_each_evaluated_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let scale = expected().norm_scale;
        sharpened_policy(dir.path(), scale);
        let tiny = fixtures().join("tiny-llama");
        let sharpened = dir.path().to_owned();

        let both = EvalOptions {
            models: vec![sharpened.clone(), tiny.clone()],
            ..options(sharpened.clone(), tiny.clone(), 4)
        };
        let reports = evaluate(&both).expect("evaluate");

        assert_eq!(reports.len(), 2);
        assert_eq!(
            reports[0],
            evaluate_one(&options(sharpened, tiny.clone(), 4))
        );
        assert_eq!(reports[1], evaluate_one(&options(tiny.clone(), tiny, 4)));
    }

    #[test]
    fn policies_with_different_tokenizers_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        sharpened_policy(dir.path(), 1.0);
        let tokenizer = dir.path().join("tokenizer.json");
        let mut text = std::fs::read_to_string(&tokenizer).expect("tokenizer");
        text.push('\n');
        std::fs::write(&tokenizer, text).expect("write");
        let tiny = fixtures().join("tiny-llama");

        let options = EvalOptions {
            models: vec![tiny.clone(), dir.path().to_owned()],
            ..options(tiny.clone(), tiny, 4)
        };

        assert!(matches!(
            evaluate(&options),
            Err(EvalError::TokenizerMismatch { other, .. }) if other == dir.path()
        ));
    }

    #[test]
    fn a_file_without_preferences_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("ties.jsonl");
        std::fs::write(
            &data,
            "{\"prompt\": \"a\", \"responses\": [{\"text\": \"x\"}, {\"text\": \"y\"}], \
             \"preference\": \"tie\"}\n",
        )
        .expect("write");
        let tiny = fixtures().join("tiny-llama");
        let mut options = options(tiny.clone(), tiny, 2);
        options.data = EvalData::File(data);
        assert!(matches!(evaluate(&options), Err(EvalError::NoPairs(_))));
    }
}
