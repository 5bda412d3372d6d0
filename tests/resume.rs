//! Crash and resume of training: the real daemon on a real broker, killed with SIGKILL while
//! it trains, restarted on the same data folder.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use rebeld::resume::{Generation, TrainerProgress, BUFFER_FILE};
use rebeld::train::gates::is_held_out;
use support::{replay_hh, resume_generation, wait_for, Daemon, DaemonConfig, Tansu};

/// Training settings that step often on the tiny model.
const TRAINING: &str = "[train]\nmin_pairs = 16\nbatch_size = 8\nmicro_batch_size = 8\n\
                        learning_rate = 1e-3\nwarmup_steps = 0\n\
                        [checkpoint]\nholdout_fraction = 0.25\n";
const HOLDOUT: f64 = 0.25;

/// A generation's counters and the ids and training counts of its buffer.
struct Saved {
    generation: u64,
    progress: TrainerProgress,
    ids: Vec<String>,
    times_trained: u64,
    held_out_trained: usize,
}

fn saved(data_dir: &Path) -> Saved {
    let generation: Generation = resume_generation(data_dir);
    let progress = generation.progress().expect("trainer.json");
    let (buffer, _) =
        rebeld::buffer::read_snapshot(generation.file(BUFFER_FILE)).expect("buffer snapshot");
    let records = buffer.to_records().expect("records");
    Saved {
        generation: generation.number,
        progress,
        ids: records.iter().map(|r| r.id.clone()).collect(),
        times_trained: records.iter().map(|r| u64::from(r.times_trained)).sum(),
        held_out_trained: records
            .iter()
            .filter(|r| r.times_trained > 0 && is_held_out(&r.id, HOLDOUT))
            .count(),
    }
}

fn assert_consistent(saved: &Saved) {
    assert_eq!(
        saved.times_trained, saved.progress.pairs_trained,
        "generation {}: the buffer's training counts must match the weights saved beside it",
        saved.generation
    );
    let unique: BTreeSet<&String> = saved.ids.iter().collect();
    assert_eq!(unique.len(), saved.ids.len(), "an event is held twice");
    assert_eq!(
        saved.held_out_trained, 0,
        "held-out events are never trained on"
    );
}

#[test]
fn sigkill_during_training_resumes_from_the_resume_state() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = DaemonConfig::new(dir.path(), &broker.bootstrap, TRAINING);
    let report = replay_hh(&broker.bootstrap, &[]);
    assert!(report.contains("sent"), "{report}");

    let daemon = Daemon::start(&config);
    wait_for(
        "a few steps in a resume state",
        Duration::from_secs(120),
        || {
            dir.path().join("resume").is_dir()
                && std::panic::catch_unwind(|| saved(dir.path()).progress.applied_steps >= 3)
                    .unwrap_or(false)
        },
    );
    daemon.kill();

    let before = saved(dir.path());
    assert_consistent(&before);
    let resumed_at = before.progress.applied_steps;

    let daemon = Daemon::start(&config);
    let line = daemon.find_line("trainer resumed", Duration::from_secs(60));
    assert!(line.contains(&format!("step={resumed_at}")), "{line}");
    wait_for(
        "training past the resume point",
        Duration::from_secs(120),
        || {
            daemon
                .metric("rebeld_train_step")
                .is_some_and(|step| step >= (resumed_at + 3) as f64)
        },
    );
    let status = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");

    let after = saved(dir.path());
    assert_consistent(&after);
    assert!(after.generation > before.generation);
    assert!(after.progress.applied_steps >= resumed_at + 3);
    // Training continued from the saved counts: what was trained before the kill is counted
    // once, and every update since added its pairs on top.
    assert!(after.progress.pairs_trained > before.progress.pairs_trained);
    let kept: BTreeSet<&String> = after.ids.iter().collect();
    assert!(
        before.ids.iter().all(|id| kept.contains(id)),
        "events restored from the resume state are kept"
    );
}
