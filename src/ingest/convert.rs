//! One Kafka message to one buffer row: parse, validate, tokenize, truncate.
//!
//! Pure and synchronous, so batches run on blocking threads, off the async runtime.

use std::sync::Arc;

use rdkafka::message::OwnedMessage;
use rdkafka::Message;

use crate::buffer::{PairRecord, Preference as StoredPreference};
use crate::config::PromptTooLong;
use crate::event::{
    parse_event, Content, EventLimits, Preference, PreferenceEvent, RejectReason, Rejection,
};

/// The policy's tokenizer as ingest needs it. Implemented by the model's tokenizer; unit
/// tests of this module use a small stand-in.
pub trait EncodePair: Send + Sync {
    /// Prompt token ids, chat template applied with the generation prompt.
    fn encode_prompt(&self, prompt: &Content) -> Result<Vec<u32>, String>;
    /// Response token ids, no special tokens and no EOS.
    fn encode_response(&self, response: &Content) -> Result<Vec<u32>, String>;
}

/// Settings of the conversion, from `[kafka]`, `[model]`, `[buffer]` and `[train]`.
#[derive(Clone, Debug)]
pub struct ConvertSettings {
    /// Event validation limits.
    pub limits: EventLimits,
    /// Prompts keep their last this-many tokens (or are dropped, by `prompt_too_long`).
    pub max_prompt_tokens: usize,
    /// Responses keep their first this-many tokens.
    pub max_response_tokens: usize,
    /// Truncate or dead-letter long prompts.
    pub prompt_too_long: PromptTooLong,
    /// Keep the texts beside the token ids.
    pub keep_text: bool,
}

/// Turns messages into rows.
#[derive(Clone)]
pub struct Converter {
    tokenizer: Arc<dyn EncodePair>,
    settings: ConvertSettings,
}

impl Converter {
    /// A converter using `tokenizer`.
    pub fn new(tokenizer: Arc<dyn EncodePair>, settings: ConvertSettings) -> Self {
        Self {
            tokenizer,
            settings,
        }
    }

    /// Converts one message, or says why it is rejected.
    pub fn convert(&self, message: &OwnedMessage, now_ms: i64) -> Result<PairRecord, Rejection> {
        let event = parse_event(message.payload(), &self.settings.limits)?;
        let mut record = self.tokenize(&event)?;

        record.topic = message.topic().to_owned();
        record.partition = message.partition();
        record.offset = message.offset();
        record.ingest_time_ms = now_ms;
        Ok(record)
    }

    /// The row for a validated event, before its Kafka coordinates are filled in.
    pub fn tokenize(&self, event: &PreferenceEvent) -> Result<PairRecord, Rejection> {
        let prompt_ids = self.prompt_ids(&event.prompt)?;
        let [first, second] = &event.responses;
        let (response_a_ids, cut_a) = self.response_ids(&first.content)?;
        let (response_b_ids, cut_b) = self.response_ids(&second.content)?;
        let keep = self.settings.keep_text;

        Ok(PairRecord {
            id: event.id.clone(),
            event_time_ms: event.event_time_ms,
            prompt_ids,
            response_a_ids,
            response_b_ids,
            truncated_a: cut_a,
            truncated_b: cut_b,
            preference: event.preference.map(stored_preference),
            confidence: event.confidence.map(|c| c as f32),
            scores_a: first.scores.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            scores_b: second.scores.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            policy_version_a: first.policy_version,
            policy_version_b: second.policy_version,
            segment: event.segment.clone(),
            source: event.source.clone(),
            prompt_text: keep.then(|| plain_text(&event.prompt)),
            response_a_text: keep.then(|| plain_text(&first.content)),
            response_b_text: keep.then(|| plain_text(&second.content)),
            ..PairRecord::default()
        })
    }

    fn prompt_ids(&self, prompt: &Content) -> Result<Vec<u32>, Rejection> {
        let mut ids = self
            .tokenizer
            .encode_prompt(prompt)
            .map_err(tokenizer_failure)?;
        let limit = self.settings.max_prompt_tokens;
        if ids.len() <= limit {
            return Ok(ids);
        }
        match self.settings.prompt_too_long {
            PromptTooLong::Drop => Err(Rejection::new(
                RejectReason::PromptTooLong,
                format!(
                    "prompt has {} tokens, model.max_prompt_tokens is {limit}",
                    ids.len()
                ),
            )),
            PromptTooLong::Truncate => Ok(ids.split_off(ids.len() - limit)),
        }
    }

    /// Token ids cut at `max_response_tokens`, and whether they were cut.
    fn response_ids(&self, response: &Content) -> Result<(Vec<u32>, bool), Rejection> {
        let mut ids = self
            .tokenizer
            .encode_response(response)
            .map_err(tokenizer_failure)?;
        if ids.is_empty() {
            return Err(Rejection::new(
                RejectReason::EmptyText,
                "a response has no tokens",
            ));
        }
        let cut = ids.len() > self.settings.max_response_tokens;
        ids.truncate(self.settings.max_response_tokens);
        Ok((ids, cut))
    }
}

fn tokenizer_failure(detail: String) -> Rejection {
    Rejection::new(RejectReason::Untokenizable, detail)
}

fn stored_preference(preference: Preference) -> StoredPreference {
    match preference {
        Preference::First => StoredPreference::A,
        Preference::Second => StoredPreference::B,
        Preference::Tie => StoredPreference::Tie,
    }
}

/// Text for inspection: the plain text, or `role: content` turns separated by blank lines.
fn plain_text(content: &Content) -> String {
    match content {
        Content::Text(text) => text.clone(),
        Content::Messages(turns) => turns
            .iter()
            .map(|turn| format!("{}: {}", turn.role.as_str(), turn.content))
            .collect::<Vec<_>>()
            .join("\n\n"),
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::Timestamp;

    use super::*;

    /// One token per byte: enough to check lengths and truncation.
    struct Bytes;

    impl EncodePair for Bytes {
        fn encode_prompt(&self, prompt: &Content) -> Result<Vec<u32>, String> {
            Ok(plain_text(prompt).bytes().map(u32::from).collect())
        }

        fn encode_response(&self, response: &Content) -> Result<Vec<u32>, String> {
            Ok(plain_text(response).bytes().map(u32::from).collect())
        }
    }

    fn converter(prompt_too_long: PromptTooLong, keep_text: bool) -> Converter {
        Converter::new(
            Arc::new(Bytes),
            ConvertSettings {
                limits: EventLimits::default(),
                max_prompt_tokens: 8,
                max_response_tokens: 4,
                prompt_too_long,
                keep_text,
            },
        )
    }

    fn message(payload: &str) -> OwnedMessage {
        OwnedMessage::new(
            Some(payload.as_bytes().to_vec()),
            None,
            "prefs".into(),
            Timestamp::NotAvailable,
            1,
            7,
            None,
        )
    }

    const EVENT: &str = r#"{"id":"e1","prompt":"0123456789","responses":[{"text":"abcdef"},
        {"text":"xy","scores":{"help":1.5}}],"preference":1,"segment":"beta"}"#;

    #[test]
    fn long_prompts_keep_their_end_and_long_responses_their_start() {
        let record = converter(PromptTooLong::Truncate, false)
            .convert(&message(EVENT), 99)
            .expect("accepted");

        assert_eq!(record.prompt_ids, b"23456789".map(u32::from).to_vec());
        assert_eq!(record.response_a_ids, b"abcd".map(u32::from).to_vec());
        assert_eq!(record.response_b_ids, b"xy".map(u32::from).to_vec());
        assert!(record.truncated_a && !record.truncated_b);
        assert_eq!(record.preference, Some(StoredPreference::B));
        assert_eq!(record.scores_b, vec![("help".to_owned(), 1.5)]);
        assert_eq!(
            (record.partition, record.offset, record.ingest_time_ms),
            (1, 7, 99)
        );
        assert_eq!(record.segment.as_deref(), Some("beta"));
        assert_eq!(record.prompt_text, None);
    }

    #[test]
    fn long_prompts_are_rejected_when_configured_to_drop() {
        let rejection = converter(PromptTooLong::Drop, false)
            .convert(&message(EVENT), 0)
            .expect_err("dropped");

        assert_eq!(rejection.reason, RejectReason::PromptTooLong);
    }

    #[test]
    fn texts_are_kept_only_when_asked() {
        let record = converter(PromptTooLong::Truncate, true)
            .convert(&message(EVENT), 0)
            .expect("accepted");

        assert_eq!(record.prompt_text.as_deref(), Some("0123456789"));
        assert_eq!(record.response_b_text.as_deref(), Some("xy"));
    }

    #[test]
    fn parse_failures_pass_through_with_their_reason() {
        let rejection = converter(PromptTooLong::Truncate, false)
            .convert(&message("{not json"), 0)
            .expect_err("rejected");

        assert_eq!(rejection.reason, RejectReason::InvalidJson);
    }
}
