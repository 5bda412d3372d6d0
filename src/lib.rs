//! rebeld: continual LLM alignment from live user feedback.
//!
//! The daemon consumes preference events from Kafka, keeps a rolling Arrow buffer of
//! prompt/response pairs, applies DRO-REBEL updates to a causal language model with libtorch,
//! publishes versioned checkpoints over HTTP and exposes Prometheus metrics. The binary in
//! `main.rs` only parses arguments and maps errors to exit codes; everything lives here.

pub mod api;
pub mod buffer;
pub mod checkpoint;
pub mod config;
pub mod daemon;
pub mod device;
pub mod embedded_kafka;
pub mod eval;
pub mod event;
pub mod experiment;
pub mod failpoint;
pub mod health;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod notices;
pub mod pull;
pub mod replay;
pub mod resume;
pub mod supervisor;
pub mod telemetry;
pub mod train;
pub mod version;
