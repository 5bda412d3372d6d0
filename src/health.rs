//! Liveness and readiness, shared by every task that contributes to them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;

/// What must be true before the daemon is ready to serve: each flag is set by the task that
/// owns the fact and cleared when it stops holding.
#[derive(Debug, Default)]
pub struct Readiness {
    consuming: AtomicBool,
    model_loaded: AtomicBool,
    version_servable: AtomicBool,
}

/// A point-in-time copy of [`Readiness`], as `/readyz` reports it.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct ReadinessReport {
    /// The consumer holds its partitions and is polling.
    pub consuming: bool,
    /// The policy model is loaded on its device.
    pub model_loaded: bool,
    /// At least one published version can be pulled.
    pub version_servable: bool,
    /// All of the above.
    pub ready: bool,
}

impl Readiness {
    /// All flags down.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sets whether the consumer is consuming.
    pub fn set_consuming(&self, value: bool) {
        self.consuming.store(value, Ordering::Relaxed);
    }

    /// Sets whether the model is loaded.
    pub fn set_model_loaded(&self, value: bool) {
        self.model_loaded.store(value, Ordering::Relaxed);
    }

    /// Sets whether a version is servable.
    pub fn set_version_servable(&self, value: bool) {
        self.version_servable.store(value, Ordering::Relaxed);
    }

    /// The current state.
    pub fn report(&self) -> ReadinessReport {
        let consuming = self.consuming.load(Ordering::Relaxed);
        let model_loaded = self.model_loaded.load(Ordering::Relaxed);
        let version_servable = self.version_servable.load(Ordering::Relaxed);
        ReadinessReport {
            consuming,
            model_loaded,
            version_servable,
            ready: consuming && model_loaded && version_servable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_flag_is_up() {
        let readiness = Readiness::new();
        readiness.set_consuming(true);
        readiness.set_model_loaded(true);
        assert!(!readiness.report().ready);

        readiness.set_version_servable(true);
        assert!(readiness.report().ready);

        readiness.set_consuming(false);
        assert!(!readiness.report().ready);
    }
}
