//! librdkafka client settings shared by the consumer, the dead-letter producer and `replay`.

use rdkafka::ClientConfig;

use crate::config::{KafkaConfig, OffsetReset};

/// Settings common to every client: brokers, SASL and the pass-through properties.
pub fn client_config(kafka: &KafkaConfig, bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    config.set(
        "client.id",
        format!("rebeld-{}", crate::version::REBELD_VERSION),
    );

    if let Some(user) = &kafka.sasl_username {
        config.set("sasl.username", user);
    }
    if let Some(password) = &kafka.sasl_password {
        config.set("sasl.password", password.expose());
    }
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config
}

/// The consumer: offsets are stored and committed by rebeld alone, after a durable snapshot.
pub fn consumer_config(kafka: &KafkaConfig, bootstrap: &str) -> ClientConfig {
    let mut config = client_config(kafka, bootstrap);
    let reset = match kafka.auto_offset_reset {
        OffsetReset::Earliest => "earliest",
        OffsetReset::Latest => "latest",
    };
    config
        .set("group.id", &kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", reset)
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "10000")
        .set("fetch.message.max.bytes", fetch_limit(kafka).to_string());
    config
}

/// A producer that waits for every in-sync replica, so an acknowledged dead letter is durable.
pub fn producer_config(kafka: &KafkaConfig, bootstrap: &str) -> ClientConfig {
    let mut config = client_config(kafka, bootstrap);
    config
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .set("message.max.bytes", fetch_limit(kafka).to_string());
    config
}

/// Oversized messages must still be fetched (and dead-lettered), so the fetch limit is twice
/// the accepted size, capped by what librdkafka allows.
fn fetch_limit(kafka: &KafkaConfig) -> u64 {
    const LIBRDKAFKA_MAX: u64 = 1_000_000_000;
    kafka
        .max_message_bytes
        .bytes()
        .saturating_mul(2)
        .clamp(1_000_000, LIBRDKAFKA_MAX)
}
