//! The frozen models the policy is compared with, their cached log-probs, and the seam through
//! which publication drives the anchor and the staleness limit.
//!
//! - The **anchor** `π_t` starts as the initial model and becomes a copy of the policy every
//!   `train.anchor_refresh_steps` applied steps, or, with 0, whenever a version is published
//!   ([`TrainControl::published`]). Its version counts refreshes from 0.
//! - The **reference** `π_ref` is the initial model for good; it is loaded only when the
//!   objective or the shaping needs it (see [`StepConfig::needs_reference`]).
//!
//! Log-probs of a pair are computed once per model version and cached under `(event id,
//! version)`; a refresh drops the entries of older versions.
//!
//! [`StepConfig::needs_reference`]: super::step::StepConfig::needs_reference

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tch::nn::VarStore;
use tch::{Device, TchError};

use crate::buffer::PairRecord;
use crate::model::llama::{Llama, ModelError};

/// Shared between the trainer and whoever publishes versions. Cheap to read from any thread.
#[derive(Debug, Default)]
pub struct TrainControl {
    published_version: AtomicU64,
    refresh_requested: AtomicBool,
}

impl TrainControl {
    /// No version published yet (version 0) and no refresh pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that policy `version` was published: the staleness limit measures from it, and
    /// with `anchor_refresh_steps = 0` the trainer copies the policy into the anchor before
    /// its next step.
    pub fn published(&self, version: u64) {
        self.published_version.store(version, Ordering::Release);
        self.refresh_requested.store(true, Ordering::Release);
    }

    /// Records that `version` is the latest published version without asking for an anchor
    /// refresh: the state found at start.
    pub fn set_current(&self, version: u64) {
        self.published_version.store(version, Ordering::Release);
    }

    /// The latest published version (0 before any).
    pub fn current_version(&self) -> u64 {
        self.published_version.load(Ordering::Acquire)
    }

    /// Asks for an anchor refresh before the next step (used by `published`; also usable on
    /// its own when `anchor_refresh_steps = 0`).
    pub fn request_anchor_refresh(&self) {
        self.refresh_requested.store(true, Ordering::Release);
    }

    /// Whether a refresh was requested since the last call.
    pub(crate) fn take_refresh_request(&self) -> bool {
        self.refresh_requested.swap(false, Ordering::AcqRel)
    }
}

/// When the anchor is refreshed: every `every` applied steps, or on request when `every` is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshPolicy {
    every: u64,
    last_at: u64,
}

impl RefreshPolicy {
    /// `train.anchor_refresh_steps`.
    pub fn new(every: u64) -> Self {
        Self { every, last_at: 0 }
    }

    /// Whether to refresh now, `applied` updates into training. A request pending under a
    /// step-count policy is consumed and ignored.
    pub fn due(&mut self, applied: u64, control: &TrainControl) -> bool {
        let requested = control.take_refresh_request();
        let due = match self.every {
            0 => requested,
            n => applied >= self.last_at + n,
        };
        if due {
            self.last_at = applied;
        }
        due
    }
}

/// A model that is never trained: the anchor or the reference.
#[derive(Debug)]
pub struct FrozenModel {
    vs: VarStore,
    model: Llama,
    version: u64,
}

impl FrozenModel {
    /// Loads `dir` onto `device`, without gradients, at version 0.
    pub fn load(dir: &Path, device: Device) -> Result<Self, ModelError> {
        let mut vs = VarStore::new(device);
        let model = Llama::from_pretrained(&vs, dir)?;
        vs.freeze();
        Ok(Self {
            vs,
            model,
            version: 0,
        })
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// Refreshes so far.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The variables, for saving and restoring.
    pub fn vs(&self) -> &VarStore {
        &self.vs
    }

    /// Sets the refresh count of weights restored from a resume state.
    pub fn set_version(&mut self, version: u64) {
        self.version = version;
    }

    /// Copies the weights of `policy` (the same architecture) and bumps the version.
    pub fn refresh_from(&mut self, policy: &VarStore) -> Result<(), TchError> {
        self.vs.copy(policy)?;
        self.version += 1;
        Ok(())
    }
}

/// `(log π(a), log π(b))` per `(event id, model version)`, bounded: when full it is emptied
/// and refills on demand.
#[derive(Debug)]
pub struct LogprobCache {
    entries: HashMap<(String, u64), (f64, f64)>,
    capacity: usize,
}

impl LogprobCache {
    /// A cache of at most `capacity` pairs (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The cached values, if any.
    pub fn get(&self, id: &str, version: u64) -> Option<(f64, f64)> {
        self.entries.get(&(id.to_owned(), version)).copied()
    }

    /// Whether `id` is cached at `version`.
    pub fn contains(&self, id: &str, version: u64) -> bool {
        self.entries.contains_key(&(id.to_owned(), version))
    }

    /// Caches values.
    pub fn insert(&mut self, id: String, version: u64, values: (f64, f64)) {
        if self.entries.len() >= self.capacity {
            self.entries.clear();
        }
        self.entries.insert((id, version), values);
    }

    /// Drops every entry of another version.
    pub fn keep_version(&mut self, version: u64) {
        self.entries.retain(|(_, v), _| *v == version);
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Whether `record` was generated by a policy more than `max_staleness` versions older than
/// `current`: either response's known version counts; 0 disables the limit.
pub fn is_stale(record: &PairRecord, current: u64, max_staleness: u64) -> bool {
    max_staleness > 0
        && [record.policy_version_a, record.policy_version_b]
            .into_iter()
            .flatten()
            .any(|v| current.saturating_sub(v) > max_staleness)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_policy_refreshes_every_n_applied_steps() {
        let control = TrainControl::new();
        let mut policy = RefreshPolicy::new(3);
        let due: Vec<u64> = (0..10).filter(|&s| policy.due(s, &control)).collect();
        assert_eq!(due, [3, 6, 9]);
        // Requests do not matter under a step count, and skipped steps do not repeat one.
        control.published(4);
        assert!(!policy.due(9, &control));
        assert!(!policy.due(11, &control));
        assert!(policy.due(12, &control));
    }

    #[test]
    fn zero_refreshes_once_per_publication() {
        let control = TrainControl::new();
        let mut policy = RefreshPolicy::new(0);
        assert!(!policy.due(5, &control));
        control.published(1);
        assert_eq!(control.current_version(), 1);
        assert!(policy.due(6, &control));
        assert!(!policy.due(7, &control));
        control.request_anchor_refresh();
        assert!(policy.due(7, &control));
    }

    #[test]
    fn cache_keys_include_the_version_and_stay_bounded() {
        let mut cache = LogprobCache::new(3);
        cache.insert("a".into(), 0, (1.0, 2.0));
        cache.insert("a".into(), 1, (3.0, 4.0));
        assert_eq!(cache.get("a", 0), Some((1.0, 2.0)));
        assert_eq!(cache.get("a", 1), Some((3.0, 4.0)));
        cache.keep_version(1);
        assert_eq!(cache.get("a", 0), None);
        assert_eq!(cache.len(), 1);
        cache.insert("b".into(), 1, (0.0, 0.0));
        cache.insert("c".into(), 1, (0.0, 0.0));
        cache.insert("d".into(), 1, (5.0, 6.0));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get("d", 1), Some((5.0, 6.0)));
    }

    #[test]
    fn staleness_counts_versions_behind_the_published_one() {
        let mut record = PairRecord {
            policy_version_a: Some(7),
            policy_version_b: Some(10),
            ..PairRecord::default()
        };
        assert!(!is_stale(&record, 10, 3));
        assert!(is_stale(&record, 11, 3));
        assert!(!is_stale(&record, 100, 0), "0 disables the limit");
        record.policy_version_a = None;
        assert!(!is_stale(&record, 13, 3));
        assert!(is_stale(&record, 14, 3));
        record.policy_version_b = None;
        assert!(
            !is_stale(&record, 1_000, 3),
            "unknown versions are never stale"
        );
    }

    #[test]
    fn a_refreshed_anchor_holds_the_policy_weights() {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let mut anchor = FrozenModel::load(&dir, Device::Cpu).expect("anchor");
        let policy_vs = VarStore::new(Device::Cpu);
        let _policy = Llama::from_pretrained(&policy_vs, &dir).expect("policy");
        tch::no_grad(|| {
            for mut v in policy_vs.trainable_variables() {
                let _ = v.g_add_scalar_(0.25);
            }
        });
        anchor.refresh_from(&policy_vs).expect("refresh");
        assert_eq!(anchor.version(), 1);
        let ours = anchor.vs.variables();
        for (name, var) in policy_vs.variables() {
            assert!(ours[&name].equal(&var), "{name}");
            assert!(!ours[&name].requires_grad());
        }
    }
}
