//! Conversion of Anthropic HH-RLHF lines into rebeld v1 events.
//!
//! An HH-RLHF line is `{"chosen": "...", "rejected": "..."}`, where each value is a whole
//! dialogue of `\n\nHuman: ` and `\n\nAssistant: ` turns, and the two dialogues share every turn
//! but the last assistant one. [`hh_to_event`] keeps the shared turns as the prompt's
//! `messages` (Human becomes user, Assistant becomes assistant) and the two last assistant turns
//! as the responses, chosen first, with `preference: 0` and `source: "hh-rlhf"`. Turn texts are
//! trimmed of surrounding whitespace. Lines that do not split that way are errors saying why:
//! they are bad input for a trainer, not something to guess around.

use std::fmt;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Role, Turn};

/// The `source` of every converted event.
pub const HH_SOURCE: &str = "hh-rlhf";

const HUMAN: &str = "Human:";
const ASSISTANT: &str = "Assistant:";
const TURN_BREAK: &str = "\n\n";

/// One of the two dialogues of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The dialogue the rater preferred.
    Chosen,
    /// The other dialogue.
    Rejected,
}

impl Side {
    /// The field name of this dialogue in the line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Side::Chosen => "chosen",
            Side::Rejected => "rejected",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an HH-RLHF line does not split into shared turns and two responses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HhSplitError {
    /// The line is not a JSON object with string `chosen` and `rejected`.
    #[error("line is not an HH-RLHF record: {0}")]
    NotARecord(String),
    /// A dialogue has text before its first turn, or no turn at all.
    #[error("the {0} dialogue does not start with a `Human:` or `Assistant:` turn")]
    NoLeadingTurn(Side),
    /// A dialogue does not end with an assistant turn.
    #[error("the {0} dialogue does not end with an assistant turn")]
    NoFinalAssistant(Side),
    /// The dialogues differ before their last assistant turns.
    #[error("the dialogues differ before their last assistant turns")]
    DifferentPrefixes,
    /// No turn comes before the last assistant turn.
    #[error("no turn comes before the last assistant turn")]
    NoPrompt,
    /// A shared turn, counted from zero, is empty.
    #[error("shared turn {0} is empty")]
    EmptyTurn(usize),
    /// The last assistant turn of a dialogue is empty.
    #[error("the {0} response is empty")]
    EmptyResponse(Side),
    /// Both last assistant turns say the same thing.
    #[error("the chosen and rejected responses are identical")]
    IdenticalResponses,
}

impl HhSplitError {
    /// A stable snake_case label for counting failures.
    pub const fn as_str(&self) -> &'static str {
        match self {
            HhSplitError::NotARecord(_) => "not_a_record",
            HhSplitError::NoLeadingTurn(_) => "no_leading_turn",
            HhSplitError::NoFinalAssistant(_) => "no_final_assistant",
            HhSplitError::DifferentPrefixes => "different_prefixes",
            HhSplitError::NoPrompt => "no_prompt",
            HhSplitError::EmptyTurn(_) => "empty_turn",
            HhSplitError::EmptyResponse(_) => "empty_response",
            HhSplitError::IdenticalResponses => "identical_responses",
        }
    }
}

/// An HH-RLHF line split into its shared turns and its two responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HhSplit {
    /// The turns both dialogues share, none empty.
    pub prompt: Vec<Turn>,
    /// The last assistant turn of the chosen dialogue.
    pub chosen: String,
    /// The last assistant turn of the rejected dialogue.
    pub rejected: String,
}

impl HhSplit {
    /// The rebeld v1 event saying the same thing, without an `id`: the parser derives one from
    /// the content, so a line converted twice gets one id.
    pub fn to_event(&self) -> Value {
        let messages: Vec<Value> = self.prompt.iter().map(turn_json).collect();
        json!({
            "messages": messages,
            "responses": [{"text": self.chosen}, {"text": self.rejected}],
            "preference": 0,
            "source": HH_SOURCE,
        })
    }
}

/// The two dialogues of a line; other keys are ignored.
#[derive(Deserialize)]
struct HhRecord {
    chosen: String,
    rejected: String,
}

/// Converts one HH-RLHF line into a rebeld v1 event (see the module docs for the mapping).
pub fn hh_to_event(line: &str) -> Result<Value, HhSplitError> {
    let record: HhRecord =
        serde_json::from_str(line).map_err(|err| HhSplitError::NotARecord(err.to_string()))?;
    let split = split_dialogues(&record.chosen, &record.rejected)?;
    Ok(split.to_event())
}

/// Splits two dialogues into their shared turns and their last assistant turns.
pub fn split_dialogues(chosen: &str, rejected: &str) -> Result<HhSplit, HhSplitError> {
    let mut prompt = parse_turns(chosen, Side::Chosen)?;
    let mut rejected_prompt = parse_turns(rejected, Side::Rejected)?;
    let chosen = pop_final_assistant(&mut prompt, Side::Chosen)?;
    let rejected = pop_final_assistant(&mut rejected_prompt, Side::Rejected)?;

    if prompt != rejected_prompt {
        return Err(HhSplitError::DifferentPrefixes);
    }
    check_prompt(&prompt)?;
    check_responses(&chosen, &rejected)?;

    Ok(HhSplit {
        prompt,
        chosen,
        rejected,
    })
}

/// Reads a dialogue's turns, in order, with trimmed texts.
fn parse_turns(dialogue: &str, side: Side) -> Result<Vec<Turn>, HhSplitError> {
    let first = strip_marker(dialogue.trim_start());
    let (mut role, mut rest) = first.ok_or(HhSplitError::NoLeadingTurn(side))?;
    let mut turns = Vec::new();

    while let Some((end, next_role, next_rest)) = next_marker(rest) {
        turns.push(trimmed_turn(role, &rest[..end]));
        (role, rest) = (next_role, next_rest);
    }
    turns.push(trimmed_turn(role, rest));
    Ok(turns)
}

/// The role whose marker starts `text`, and the text after the marker.
fn strip_marker(text: &str) -> Option<(Role, &str)> {
    if let Some(rest) = text.strip_prefix(HUMAN) {
        return Some((Role::User, rest));
    }
    text.strip_prefix(ASSISTANT)
        .map(|rest| (Role::Assistant, rest))
}

/// The next turn break: where the current text ends, the next role and the text after it.
///
/// Breaks are searched overlapping, so the marker in `"\n\n\nHuman:"` is found too.
fn next_marker(text: &str) -> Option<(usize, Role, &str)> {
    let mut from = 0;
    while let Some(found) = text[from..].find(TURN_BREAK) {
        let at = from + found;
        if let Some((role, rest)) = strip_marker(&text[at + TURN_BREAK.len()..]) {
            return Some((at, role, rest));
        }
        from = at + 1;
    }
    None
}

fn trimmed_turn(role: Role, text: &str) -> Turn {
    Turn {
        role,
        content: text.trim().to_owned(),
    }
}

/// Removes and returns the dialogue's last turn, which must be the assistant's.
fn pop_final_assistant(turns: &mut Vec<Turn>, side: Side) -> Result<String, HhSplitError> {
    match turns.pop() {
        Some(Turn {
            role: Role::Assistant,
            content,
        }) => Ok(content),
        _ => Err(HhSplitError::NoFinalAssistant(side)),
    }
}

fn check_prompt(prompt: &[Turn]) -> Result<(), HhSplitError> {
    if prompt.is_empty() {
        return Err(HhSplitError::NoPrompt);
    }
    match prompt.iter().position(|turn| turn.content.is_empty()) {
        Some(i) => Err(HhSplitError::EmptyTurn(i)),
        None => Ok(()),
    }
}

fn check_responses(chosen: &str, rejected: &str) -> Result<(), HhSplitError> {
    if chosen.is_empty() {
        return Err(HhSplitError::EmptyResponse(Side::Chosen));
    }
    if rejected.is_empty() {
        return Err(HhSplitError::EmptyResponse(Side::Rejected));
    }
    if chosen == rejected {
        return Err(HhSplitError::IdenticalResponses);
    }
    Ok(())
}

fn turn_json(turn: &Turn) -> Value {
    json!({"role": turn.role.as_str(), "content": turn.content})
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::io::BufRead;
    use std::path::PathBuf;

    use super::*;
    use crate::event::{parse_event, Content, EventLimits, Format, Preference, PreferenceEvent};

    fn line(chosen: &str, rejected: &str) -> String {
        json!({"chosen": chosen, "rejected": rejected}).to_string()
    }

    fn split_error(chosen: &str, rejected: &str) -> Option<HhSplitError> {
        hh_to_event(&line(chosen, rejected)).err()
    }

    fn parse_value(event: &Value) -> PreferenceEvent {
        let bytes = event.to_string().into_bytes();
        match parse_event(Some(&bytes), &EventLimits::default()) {
            Ok(event) => event,
            Err(rejection) => panic!("converted event rejected: {rejection}"),
        }
    }

    fn user(content: &str) -> Turn {
        Turn {
            role: Role::User,
            content: content.to_owned(),
        }
    }

    fn assistant(content: &str) -> Turn {
        Turn {
            role: Role::Assistant,
            content: content.to_owned(),
        }
    }

    const SHARED: &str = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\n\
                          Human: Tell me a joke.";

    #[test]
    fn multi_turn_dialogues_split_into_shared_turns_and_two_responses() {
        let chosen = format!("{SHARED}\n\nAssistant: Why did the chicken cross the road?");
        let rejected = format!("{SHARED}\n\nAssistant: No.");

        let split = split_dialogues(&chosen, &rejected).map_err(|e| e.to_string());
        let expected = HhSplit {
            prompt: vec![
                user("Hi there"),
                assistant("Hello! How can I help?"),
                user("Tell me a joke."),
            ],
            chosen: "Why did the chicken cross the road?".to_owned(),
            rejected: "No.".to_owned(),
        };
        assert_eq!(split, Ok(expected));
    }

    #[test]
    fn converted_event_parses_as_v1_with_chosen_first() {
        let value = hh_to_event(&line(
            "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
            "\n\nHuman: What is 2+2?\n\nAssistant: 5.",
        ));
        let event = parse_value(&value.expect("the dialogues split"));

        assert_eq!(event.format, Format::V1);
        assert_eq!(event.prompt, Content::Messages(vec![user("What is 2+2?")]));
        assert_eq!(event.responses[0].content, Content::Text("4.".to_owned()));
        assert_eq!(event.responses[1].content, Content::Text("5.".to_owned()));
        assert_eq!(event.preference, Some(Preference::First));
        assert_eq!(event.source.as_deref(), Some(HH_SOURCE));
        assert!(event.id.starts_with(crate::event::HASH_ID_PREFIX));
    }

    #[test]
    fn text_inside_turns_keeps_its_blank_lines_and_colons() {
        let chosen = "\n\nHuman: List two:\n\n1. a\n\nHuman said: b\n\nAssistant: a, b";
        let rejected = "\n\nHuman: List two:\n\n1. a\n\nHuman said: b\n\nAssistant: none";

        let split = split_dialogues(chosen, rejected).map(|s| s.prompt);
        assert_eq!(split, Ok(vec![user("List two:\n\n1. a\n\nHuman said: b")]));
    }

    #[test]
    fn markers_after_extra_newlines_are_found() {
        let split = split_dialogues(
            "Human: Hi\n\n\nAssistant: Yo",
            "Human: Hi\n\n\nAssistant: Hey",
        );

        assert_eq!(split.map(|s| s.prompt), Ok(vec![user("Hi")]));
    }

    #[test]
    fn lines_that_do_not_split_say_why() {
        use HhSplitError::*;
        let cases = [
            (
                (
                    "\n\nHuman: A\n\nAssistant: x",
                    "\n\nHuman: B\n\nAssistant: y",
                ),
                DifferentPrefixes,
            ),
            (
                (
                    "\n\nHuman: A\n\nAssistant: x",
                    "\n\nHuman: A\n\nHuman: more",
                ),
                NoFinalAssistant(Side::Rejected),
            ),
            (
                ("\n\nHuman: A", "\n\nHuman: A\n\nAssistant: y"),
                NoFinalAssistant(Side::Chosen),
            ),
            (
                (
                    "preamble\n\nHuman: A\n\nAssistant: x",
                    "\n\nHuman: A\n\nAssistant: y",
                ),
                NoLeadingTurn(Side::Chosen),
            ),
            (
                ("\n\nHuman: A\n\nAssistant: x", ""),
                NoLeadingTurn(Side::Rejected),
            ),
            (
                ("\n\nHuman: A\n\nAssistant:", "\n\nHuman: A\n\nAssistant: y"),
                EmptyResponse(Side::Chosen),
            ),
            (
                (
                    "\n\nHuman: A\n\nAssistant: x",
                    "\n\nHuman: A\n\nAssistant:   ",
                ),
                EmptyResponse(Side::Rejected),
            ),
            (
                (
                    "\n\nHuman: A\n\nAssistant: same",
                    "\n\nHuman: A\n\nAssistant: same ",
                ),
                IdenticalResponses,
            ),
            (("\n\nAssistant: x", "\n\nAssistant: y"), NoPrompt),
            (
                ("\n\nHuman: \n\nAssistant: x", "\n\nHuman:\n\nAssistant: y"),
                EmptyTurn(0),
            ),
        ];

        for ((chosen, rejected), expected) in cases {
            assert_eq!(
                split_error(chosen, rejected),
                Some(expected),
                "{chosen:?} / {rejected:?}"
            );
        }
    }

    #[test]
    fn lines_that_are_not_records_are_errors() {
        for bad in [
            "",
            "[]",
            r#"{"chosen":"x"}"#,
            r#"{"chosen":1,"rejected":"y"}"#,
        ] {
            let label = hh_to_event(bad).err().map(|e| e.as_str());
            assert_eq!(label, Some("not_a_record"), "{bad}");
        }
    }

    /// The real test split, when the shared data folder is present. Texts are never printed:
    /// the data set holds offensive material by design.
    #[test]
    fn real_harmless_base_test_split_converts_and_parses() {
        let path = hh_data_dir().join("harmless-base-test.jsonl.gz");
        let Ok(file) = std::fs::File::open(&path) else {
            eprintln!("skipped: {} is absent", path.display());
            return;
        };

        let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(file));
        let mut failures: BTreeMap<&str, usize> = BTreeMap::new();
        let mut ids = BTreeSet::new();
        let mut lines = 0;

        for line in reader.lines() {
            let line = line.unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
            lines += 1;
            match hh_to_event(&line) {
                Ok(value) => {
                    ids.insert(parse_value(&value).id);
                }
                Err(err) => *failures.entry(err.as_str()).or_default() += 1,
            }
        }

        let failed: usize = failures.values().sum();
        let split = lines - failed;
        eprintln!(
            "{lines} lines, {split} split, {} distinct ids, failures {failures:?}",
            ids.len()
        );
        assert_eq!(lines, 2_023);
        assert!(split >= 2_000, "only {split} of {lines} lines split");
    }

    /// `REBELD_HH_RLHF_DIR`, or `shared/data/hh-rlhf` beside the crate's checkout.
    fn hh_data_dir() -> PathBuf {
        match std::env::var_os("REBELD_HH_RLHF_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/hh-rlhf"),
        }
    }
}
