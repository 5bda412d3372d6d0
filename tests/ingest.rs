//! Ingest against a real tansu broker over TCP: exactly once into the buffer, across crashes,
//! with every malformed message in the dead-letter topic.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use support::{
    hh_expected_ids, replay_hh, snapshot_contents, wait_for, Daemon, DaemonConfig, Tansu,
};

const HH_PAIRS: usize = 2015;
const HH_UNSPLITTABLE: usize = 8;

fn assert_exactly_once(data_dir: &std::path::Path) {
    let (ids, stats) = snapshot_contents(data_dir);
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    let expected = hh_expected_ids();

    assert_eq!(expected.len(), HH_PAIRS);
    assert_eq!(ids.len(), unique.len(), "an id is in the buffer twice");
    let missing: Vec<_> = expected.difference(&unique).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} ids missing, e.g. {missing:?}",
        expected.len() - unique.len()
    );
    assert_eq!(unique, expected);
    assert_eq!(stats.duplicates, 0, "a message was applied twice");
}

#[test]
fn every_hh_pair_lands_in_the_buffer_exactly_once() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = DaemonConfig::new(dir.path(), &broker.bootstrap, "");
    let daemon = Daemon::start(&config);

    let report = replay_hh(&broker.bootstrap, &[]);
    assert!(
        report.contains(&format!(
            "sent {HH_PAIRS} events, skipped {HH_UNSPLITTABLE} lines"
        )),
        "{report}"
    );
    wait_for("every pair in the buffer", Duration::from_secs(120), || {
        daemon.metric("rebeld_buffer_rows") == Some(HH_PAIRS as f64)
    });
    wait_for(
        "training steps on the ingested pairs",
        Duration::from_secs(120),
        || {
            daemon
                .metric("rebeld_train_steps_total")
                .is_some_and(|steps| steps >= 3.0)
        },
    );

    let status = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    assert_exactly_once(dir.path());
}

#[test]
fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    // A dedup window of one id leaves the offsets alone to prevent double counting.
    let config = DaemonConfig::new(
        dir.path(),
        &broker.bootstrap,
        "[buffer]\ndedup_window = 1\n",
    );
    let replay = {
        let bootstrap = broker.bootstrap.clone();
        std::thread::spawn(move || replay_hh(&bootstrap, &["--rate", "200"]))
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for _ in 0..5 {
        let daemon = Daemon::start(&config);
        std::thread::sleep(Duration::from_millis(rng.random_range(800..3000)));
        daemon.kill();
    }
    let report = replay.join().expect("replay thread");
    assert!(
        report.contains(&format!("sent {HH_PAIRS} events")),
        "{report}"
    );

    let daemon = Daemon::start(&config);
    daemon.wait_for_metric(
        "rebeld_buffer_rows",
        HH_PAIRS as f64,
        Duration::from_secs(180),
    );
    let status = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    assert_exactly_once(dir.path());
}

/// A member killed while it shares the group leaves its partitions to the survivor. tansu
/// drops the dead member once its session expires but answers the survivor's rejoin with its
/// old share, so the survivor must notice it is alone and short, and rejoin.
#[test]
fn a_survivor_takes_over_the_partitions_of_a_killed_member() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let first_dir = tempfile::tempdir().expect("tempdir");
    let second_dir = tempfile::tempdir().expect("tempdir");
    let first = Daemon::start(&DaemonConfig::new(first_dir.path(), &broker.bootstrap, ""));
    first.wait_for_line("partitions assigned", Duration::from_secs(60));

    let survivor = Daemon::start(&DaemonConfig::new(second_dir.path(), &broker.bootstrap, ""));
    let share = survivor.wait_for_line("partitions assigned", Duration::from_secs(60));
    first.wait_for_line("partitions assigned", Duration::from_secs(60));
    assert!(
        !share.contains("[0, 1, 2]"),
        "the survivor took every partition while the first member lived: {share}"
    );

    first.kill();
    let report = replay_hh(&broker.bootstrap, &[]);
    assert!(
        report.contains(&format!("sent {HH_PAIRS} events")),
        "{report}"
    );
    survivor.wait_for_metric(
        "rebeld_buffer_rows",
        HH_PAIRS as f64,
        Duration::from_secs(120),
    );
    // tansu 0.6 never hands the dead member's partitions over by itself: the rejoin did.
    assert!(
        survivor.metric("rebeld_ingest_group_rejoins_total") >= Some(1.0),
        "the survivor was given every partition without rejoining"
    );

    let status = survivor.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    assert_exactly_once(second_dir.path());
}
