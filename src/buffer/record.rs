//! The row type: one preference pair as the consumer decoded it.

/// Which of the two responses the user preferred.
///
/// Stored in Arrow as `Int8`: 0 for [`Preference::A`], 1 for [`Preference::B`], 2 for
/// [`Preference::Tie`], null when the event carried scores only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Preference {
    /// Response A was preferred.
    A,
    /// Response B was preferred.
    B,
    /// Neither response was preferred.
    Tie,
}

impl Preference {
    /// The code stored in the `preference` column.
    pub fn code(self) -> i8 {
        match self {
            Preference::A => 0,
            Preference::B => 1,
            Preference::Tie => 2,
        }
    }

    /// The preference for a stored code, or `None` for a code outside 0..=2.
    pub fn from_code(code: i8) -> Option<Self> {
        match code {
            0 => Some(Preference::A),
            1 => Some(Preference::B),
            2 => Some(Preference::Tie),
            _ => None,
        }
    }
}

/// One preference pair: a prompt and two responses, already tokenized.
///
/// The two responses always travel together; the buffer never stores or returns one
/// without the other and the prompt.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairRecord {
    /// Idempotency key of the event; the buffer holds at most one row per id.
    pub id: String,
    /// Kafka topic the event was read from.
    pub topic: String,
    /// Kafka partition the event was read from.
    pub partition: i32,
    /// Kafka offset of the event.
    pub offset: i64,
    /// When the user gave the feedback (Unix milliseconds), when the event says.
    pub event_time_ms: Option<i64>,
    /// When the daemon read the event (Unix milliseconds); `max_age_ms` is measured from it.
    pub ingest_time_ms: i64,
    /// Token ids of the prompt.
    pub prompt_ids: Vec<u32>,
    /// Token ids of response A.
    pub response_a_ids: Vec<u32>,
    /// Token ids of response B.
    pub response_b_ids: Vec<u32>,
    /// Whether response A was cut at `max_response_tokens` (then it gets no EOS).
    pub truncated_a: bool,
    /// Whether response B was cut at `max_response_tokens`.
    pub truncated_b: bool,
    /// The stated preference; `None` when the event carried scores only.
    pub preference: Option<Preference>,
    /// How sure the labeller was of the preference, when the event says.
    pub confidence: Option<f32>,
    /// Per-objective scores of response A, in the order the event listed them.
    pub scores_a: Vec<(String, f64)>,
    /// Per-objective scores of response B, in the order the event listed them.
    pub scores_b: Vec<(String, f64)>,
    /// Version of the policy that generated response A, when known.
    pub policy_version_a: Option<u64>,
    /// Version of the policy that generated response B, when known.
    pub policy_version_b: Option<u64>,
    /// User segment the event belongs to, when known.
    pub segment: Option<String>,
    /// Application or surface the event came from, when known.
    pub source: Option<String>,
    /// Prompt text, kept only when the daemon runs with `keep_text`.
    pub prompt_text: Option<String>,
    /// Text of response A, kept only when the daemon runs with `keep_text`.
    pub response_a_text: Option<String>,
    /// Text of response B, kept only when the daemon runs with `keep_text`.
    pub response_b_text: Option<String>,
    /// How many times the trainer has used this pair; 0 for a fresh event.
    ///
    /// [`RollingBuffer::mark_trained`](super::RollingBuffer::mark_trained) increments it.
    pub times_trained: u32,
}
