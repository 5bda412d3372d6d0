//! `manifest.json`: what a committed version holds and where it came from.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// The description of one committed version, written once as `manifest.json` and never
/// changed afterwards. Readers ignore fields they do not know, so fields can be added within
/// a format; an incompatible change raises [`MANIFEST_FORMAT`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The version number (the folder is `v` and this number on 8 digits).
    pub version: u64,
    /// The version this one was trained from, if any.
    pub parent: Option<u64>,
    /// When the version was committed, RFC 3339 UTC.
    pub created_at: String,
    /// Every file of the version except `manifest.json` and the completion marker.
    pub files: BTreeMap<String, FileEntry>,
    /// The trainer's optimizer step at publication.
    pub trainer_step: u64,
    /// The training objective (`rebel`, `chi2`, …).
    pub objective: String,
    /// The ambiguity-set radius.
    pub radius: f64,
    /// Events consumed since the parent.
    pub events_trained: u64,
    /// Preference pairs trained on since the parent.
    pub pairs_trained: u64,
    /// The Kafka offsets and event times the training data came from.
    pub lineage: Lineage,
    /// The publication gates and their outcome.
    pub gates: GateReport,
}

/// One file of a version.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Where a version's training data came from.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lineage {
    /// Offset ranges consumed, per topic partition.
    pub partitions: Vec<PartitionRange>,
    /// Oldest and newest event time (epoch milliseconds), when known.
    pub event_time_ms: Option<[i64; 2]>,
}

/// An inclusive offset range of one partition.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartitionRange {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// First offset trained on.
    pub first_offset: i64,
    /// Last offset trained on.
    pub last_offset: i64,
}

/// The publication gates of a version.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GateReport {
    /// True when every check passed; a version that failed is kept as rejected and can
    /// never become latest.
    pub passed: bool,
    /// Each check.
    pub checks: Vec<GateCheck>,
}

/// One gate check.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GateCheck {
    /// The check, e.g. `heldout_accuracy_drop`.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// The measured value; absent when there was nothing to measure.
    pub value: Option<f64>,
    /// The bound it was held to; absent when none applied.
    pub threshold: Option<f64>,
    /// A human-readable explanation.
    pub detail: String,
}

impl GateReport {
    /// One line per failed check, for listings and refusals.
    pub fn reasons(&self) -> Vec<String> {
        let failed = self.checks.iter().filter(|check| !check.passed);
        let mut reasons: Vec<String> = failed
            .map(|check| match (check.value, check.threshold) {
                (Some(value), Some(threshold)) => format!(
                    "{}: {value} against threshold {threshold} ({})",
                    check.name, check.detail
                ),
                _ => format!("{}: {}", check.name, check.detail),
            })
            .collect();
        if !self.passed && reasons.is_empty() {
            reasons.push("gates failed".to_owned());
        }
        reasons
    }
}

/// What the publisher supplies at commit: everything in [`Manifest`] but the fields the
/// store fills in (format, version, creation time and the file list).
#[derive(Clone, Debug, PartialEq)]
pub struct ManifestFields {
    /// See [`Manifest::parent`].
    pub parent: Option<u64>,
    /// See [`Manifest::trainer_step`].
    pub trainer_step: u64,
    /// See [`Manifest::objective`].
    pub objective: String,
    /// See [`Manifest::radius`].
    pub radius: f64,
    /// See [`Manifest::events_trained`].
    pub events_trained: u64,
    /// See [`Manifest::pairs_trained`].
    pub pairs_trained: u64,
    /// See [`Manifest::lineage`].
    pub lineage: Lineage,
    /// See [`Manifest::gates`].
    pub gates: GateReport,
}

impl Manifest {
    /// Assembles a manifest from the publisher's fields and the store's.
    pub(crate) fn assemble(
        version: u64,
        created_at: String,
        files: BTreeMap<String, FileEntry>,
        fields: ManifestFields,
    ) -> Self {
        Self {
            format: MANIFEST_FORMAT,
            version,
            parent: fields.parent,
            created_at,
            files,
            trainer_step: fields.trainer_step,
            objective: fields.objective,
            radius: fields.radius,
            events_trained: fields.events_trained,
            pairs_trained: fields.pairs_trained,
            lineage: fields.lineage,
            gates: fields.gates,
        }
    }
}
