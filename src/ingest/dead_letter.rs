//! The dead-letter topic: every rejected message, byte for byte, with why it was rejected.
//!
//! A rejected message's offset advances only after the dead-letter topic acknowledged it, so
//! bad input is never silently dropped. Delivery is retried with backoff; while it fails the
//! partition waits (losing the message would be worse) and each failure is counted.

use std::time::Duration;

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
        let headers = dead_letter_headers(message, rejection);
        let mut backoff = FIRST_BACKOFF;

        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers.clone());
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(payload) = message.payload() {
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
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = token.cancelled() => return Err(DeliveryCancelled),
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// The original headers followed by rebeld's own.
fn dead_letter_headers(message: &OwnedMessage, rejection: &Rejection) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(original) = message.headers() {
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

        let headers = dead_letter_headers(&message, &rejection);

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
    fn long_details_are_cut_on_a_character_boundary() {
        let text = "é".repeat(400);
        let cut = truncate_at_char(&text, 301);

        assert!(cut.len() <= 301);
        assert!(text.starts_with(cut));
    }
}
