//! The dead-letter topic: every rejected message, byte for byte, with why it was rejected.
//!
//! A rejected message's offset advances only after the dead-letter topic acknowledged it, so
//! bad input is never silently dropped. Delivery is retried with backoff; while it fails the
//! partition waits (losing the message would be worse) and each failure is counted.
//!
//! A message too large for the dead-letter topic itself (librdkafka's or the broker's
//! `message.max.bytes`) could never be delivered whole, so its letter leaves out the value,
//! then also the key and the original headers, and says so in [`OMITTED_HEADER`].

use std::time::Duration;

use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

use crate::event::Rejection;

/// Header naming the rejection reason (one label of `RejectReason::ALL`).
pub const REASON_HEADER: &str = "rebeld.reason";
/// Header with the human-readable detail.
pub const DETAIL_HEADER: &str = "rebeld.detail";
/// Header with the source topic.
pub const SOURCE_TOPIC_HEADER: &str = "rebeld.source.topic";
/// Header with the source partition.
pub const SOURCE_PARTITION_HEADER: &str = "rebeld.source.partition";
/// Header with the source offset.
pub const SOURCE_OFFSET_HEADER: &str = "rebeld.source.offset";

/// Header present when the letter leaves out parts of a message too large to deliver whole:
/// `value`, or `value,key,headers`.
pub const OMITTED_HEADER: &str = "rebeld.omitted";

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const DETAIL_LIMIT: usize = 512;

/// Delivery stopped because the daemon is shutting down.
#[derive(Debug, thiserror::Error)]
#[error("dead-letter delivery abandoned by shutdown")]
pub struct DeliveryCancelled;

/// Produces rejected messages to the dead-letter topic.
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetters {
    /// Wraps a producer.
    pub fn new(producer: FutureProducer, topic: String) -> Self {
        Self { producer, topic }
    }

    /// Delivers one rejected message; retries until acknowledged or `token` fires.
    /// `on_failure` is called once per failed attempt (for the failure counter).
    pub async fn deliver(
        &self,
        message: &OwnedMessage,
        rejection: &Rejection,
        token: &CancellationToken,
        mut on_failure: impl FnMut(&str),
    ) -> Result<(), DeliveryCancelled> {
        let mut carry = Carry::Whole;
        let mut backoff = FIRST_BACKOFF;

        loop {
            let headers = dead_letter_headers(message, rejection, carry);
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers);
            if let Some(key) = message.key().filter(|_| carry != Carry::RebeldHeaders) {
                record = record.key(key);
            }
            if let Some(payload) = message.payload().filter(|_| carry == Carry::Whole) {
                record = record.payload(payload);
            }

            let sent = tokio::select! {
                sent = self.producer.send(record, Duration::from_secs(30)) => sent,
                () = token.cancelled() => return Err(DeliveryCancelled),
            };
            let Err((error, _)) = sent else {
                return Ok(());
            };

            on_failure(&error.to_string());
            if error.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) {
                if let Some(smaller) = carry.smaller() {
                    carry = smaller;
                    continue;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = token.cancelled() => return Err(DeliveryCancelled),
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// How much of the rejected message a letter carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carry {
    /// Key, value and headers.
    Whole,
    /// Key and headers.
    WithoutValue,
    /// Only rebeld's headers.
    RebeldHeaders,
}

impl Carry {
    /// The next smaller letter, after a size refusal.
    fn smaller(self) -> Option<Self> {
        match self {
            Self::Whole => Some(Self::WithoutValue),
            Self::WithoutValue => Some(Self::RebeldHeaders),
            Self::RebeldHeaders => None,
        }
    }

    fn omitted(self) -> Option<&'static str> {
        match self {
            Self::Whole => None,
            Self::WithoutValue => Some("value"),
            Self::RebeldHeaders => Some("value,key,headers"),
        }
    }
}

/// The original headers (unless `carry` leaves them out) followed by rebeld's own.
fn dead_letter_headers(
    message: &OwnedMessage,
    rejection: &Rejection,
    carry: Carry,
) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    let original = message.headers().filter(|_| carry != Carry::RebeldHeaders);
    if let Some(original) = original {
        for header in original.iter() {
            headers = headers.insert(Header {
                key: header.key,
                value: header.value,
            });
        }
    }

    let detail = truncate_at_char(&rejection.detail, DETAIL_LIMIT);
    let partition = message.partition().to_string();
    let offset = message.offset().to_string();
    for (key, value) in [
        (REASON_HEADER, rejection.reason.as_str()),
        (DETAIL_HEADER, detail),
        (SOURCE_TOPIC_HEADER, message.topic()),
        (SOURCE_PARTITION_HEADER, partition.as_str()),
        (SOURCE_OFFSET_HEADER, offset.as_str()),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    if let Some(omitted) = carry.omitted() {
        headers = headers.insert(Header {
            key: OMITTED_HEADER,
            value: Some(omitted.as_bytes()),
        });
    }
    headers
}

fn truncate_at_char(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use rdkafka::message::Timestamp;

    use super::*;
    use crate::event::RejectReason;

    fn header_value(headers: &OwnedHeaders, key: &str) -> Option<String> {
        headers
            .iter()
            .find(|h| h.key == key)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    #[test]
    fn headers_keep_the_originals_and_name_the_source() {
        let original = OwnedHeaders::new().insert(Header {
            key: "trace-id",
            value: Some(b"abc".as_slice()),
        });
        let message = OwnedMessage::new(
            Some(b"{".to_vec()),
            Some(b"k".to_vec()),
            "prefs".into(),
            Timestamp::NotAvailable,
            2,
            41,
            Some(original),
        );
        let rejection = Rejection::new(RejectReason::InvalidJson, "EOF while parsing");

        let headers = dead_letter_headers(&message, &rejection, Carry::Whole);

        assert_eq!(header_value(&headers, "trace-id").as_deref(), Some("abc"));
        assert_eq!(
            header_value(&headers, REASON_HEADER).as_deref(),
            Some("invalid_json")
        );
        assert_eq!(
            header_value(&headers, SOURCE_TOPIC_HEADER).as_deref(),
            Some("prefs")
        );
        assert_eq!(
            header_value(&headers, SOURCE_PARTITION_HEADER).as_deref(),
            Some("2")
        );
        assert_eq!(
            header_value(&headers, SOURCE_OFFSET_HEADER).as_deref(),
            Some("41")
        );
    }

    #[test]
    fn smaller_letters_say_what_they_leave_out() {
        let original = OwnedHeaders::new().insert(Header {
            key: "trace-id",
            value: Some(b"abc".as_slice()),
        });
        let message = OwnedMessage::new(
            Some(vec![b'x'; 16]),
            Some(b"k".to_vec()),
            "prefs".into(),
            Timestamp::NotAvailable,
            0,
            7,
            Some(original),
        );
        let rejection = Rejection::new(RejectReason::TooLarge, "16 bytes");

        let whole = dead_letter_headers(&message, &rejection, Carry::Whole);
        let no_value = dead_letter_headers(&message, &rejection, Carry::WithoutValue);
        let bare = dead_letter_headers(&message, &rejection, Carry::RebeldHeaders);

        assert_eq!(header_value(&whole, OMITTED_HEADER), None);
        assert_eq!(
            header_value(&no_value, OMITTED_HEADER).as_deref(),
            Some("value")
        );
        assert_eq!(header_value(&no_value, "trace-id").as_deref(), Some("abc"));
        assert_eq!(
            header_value(&bare, OMITTED_HEADER).as_deref(),
            Some("value,key,headers")
        );
        assert_eq!(header_value(&bare, "trace-id"), None);
        assert_eq!(
            header_value(&bare, SOURCE_OFFSET_HEADER).as_deref(),
            Some("7")
        );
        assert_eq!(Carry::RebeldHeaders.smaller(), None);
    }

    #[test]
    fn long_details_are_cut_on_a_character_boundary() {
        let text = "é".repeat(400);
        let cut = truncate_at_char(&text, 301);

        assert!(cut.len() <= 301);
        assert!(text.starts_with(cut));
    }
}
