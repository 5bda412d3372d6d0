//! Publication by the real daemon on a real broker: versions with lineage and gates, served
//! and pulled over HTTP; a gate that fails; a crash before a version's completion marker.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use support::{replay_hh, wait_for, Daemon, DaemonConfig, Tansu, BINARY, TOPIC};

/// Training on the tiny model that publishes every `every` steps.
fn publishing(every: u64, checkpoint: &str) -> String {
    format!(
        "[train]\nmin_pairs = 16\nbatch_size = 8\nmicro_batch_size = 8\nlearning_rate = 1e-3\n\
         warmup_steps = 0\n\
         [checkpoint]\npublish_every_steps = {every}\nmin_new_pairs = 8\n\
         holdout_fraction = 0.2\ndtype = \"f32\"\n{checkpoint}"
    )
}

fn latest_version(daemon: &Daemon) -> Option<u64> {
    let (status, manifest) = daemon.api_json("/v1/versions/latest");
    (status == 200)
        .then(|| manifest["version"].as_u64())
        .flatten()
}

fn sha256_hex(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("pulled file")))
}

#[test]
fn versions_are_published_with_lineage_and_gates_and_pulled_intact() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = publishing(4, "max_kl = 1e9\nmax_accuracy_drop = 1.0\n");
    let config = DaemonConfig::new(&dir.path().join("data"), &broker.bootstrap, &extra);
    let daemon = Daemon::start(&config);
    replay_hh(&broker.bootstrap, &[]);

    wait_for("version 3 is latest", Duration::from_secs(300), || {
        latest_version(&daemon).is_some_and(|v| v >= 3)
    });
    let (_, manifest) = daemon.api_json("/v1/versions/3");
    assert_eq!(manifest["parent"], 2, "{manifest}");
    let pairs = manifest["pairs_trained"].as_u64().expect("pairs");
    let events = manifest["events_trained"].as_u64().expect("events");
    assert!(pairs >= 8 && events >= 1 && events <= pairs, "{manifest}");
    let ranges = manifest["lineage"]["partitions"]
        .as_array()
        .expect("lineage");
    assert!(!ranges.is_empty(), "{manifest}");
    for range in ranges {
        assert_eq!(range["topic"], TOPIC);
        assert!(range["first_offset"].as_i64() <= range["last_offset"].as_i64());
    }
    let checks: Vec<&str> = manifest["gates"]["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        checks,
        ["finite_weights", "heldout_accuracy", "kl_to_latest"]
    );
    assert_eq!(manifest["gates"]["passed"], true);
    let kl = &manifest["gates"]["checks"][2]["value"];
    assert!(
        kl.as_f64().is_some_and(|kl| kl > 0.0),
        "trained weights moved: {manifest}"
    );

    let pulled = dir.path().join("pulled");
    let output = std::process::Command::new(BINARY)
        .args(["pull", "--server"])
        .arg(format!("http://127.0.0.1:{}", daemon.api_port))
        .arg("--to")
        .arg(&pulled)
        .output()
        .expect("rebeld pull");
    assert!(output.status.success(), "{output:?}");
    let (_, latest) = daemon.api_json("/v1/versions/latest");
    let files = latest["files"].as_object().expect("files");
    for name in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert_eq!(
            files[name]["sha256"].as_str(),
            Some(sha256_hex(&pulled.join(name)).as_str()),
            "{name}"
        );
    }
    let config_json: Value =
        serde_json::from_slice(&std::fs::read(pulled.join("config.json")).expect("config"))
            .expect("config.json");
    assert_eq!(config_json["dtype"], "float32");

    let notices = promotion_notices(&broker.bootstrap, 3);
    assert_eq!(notices.len(), 3, "{notices:?}");
    for (i, notice) in notices.iter().enumerate() {
        let version = i as u64 + 1;
        assert_eq!(notice["version"], version, "{notice}");
        let url = format!("http://127.0.0.1:{}/v1/versions/{version}", daemon.api_port);
        assert_eq!(notice["manifest_url"], url.as_str());
    }
    assert_eq!(
        notices[2]["weights_sha256"].as_str(),
        files["model.safetensors"]["sha256"].as_str()
    );

    concurrent_downloads_verify_while_training_goes_on(&daemon);

    let published = daemon.metric("rebeld_checkpoint_versions_published_total");
    assert!(published.is_some_and(|n| n >= 2.0), "{published:?}");
    let gauge = daemon.metric("rebeld_checkpoint_latest_version");
    assert!(gauge.is_some_and(|v| v >= 3.0), "{gauge:?}");
    let status = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
}

/// 32 clients download the latest weights at once, each verifying the manifest's sha256,
/// while the trainer keeps stepping (and publishing).
fn concurrent_downloads_verify_while_training_goes_on(daemon: &Daemon) {
    let (_, manifest) = daemon.api_json("/v1/versions/latest");
    let version = manifest["version"].as_u64().expect("version");
    let expected = manifest["files"]["model.safetensors"]["sha256"]
        .as_str()
        .expect("sha256")
        .to_owned();
    let step_before = daemon.metric("rebeld_train_step").unwrap_or(0.0);
    let port = daemon.api_port;
    let path = format!("/v1/versions/{version}/files/model.safetensors");
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || support::http_get_bytes(port, &path).expect("download"))
        })
        .collect();
    for client in clients {
        let (status, body) = client.join().expect("client thread");
        assert_eq!(status, 200);
        assert_eq!(hex::encode(Sha256::digest(&body)), expected);
    }
    wait_for(
        "steps during and after the downloads",
        Duration::from_secs(120),
        || {
            daemon
                .metric("rebeld_train_step")
                .is_some_and(|step| step > step_before)
        },
    );
}

/// The promotion notices of versions 1 to `count` on the checkpoints topic, in order.
fn promotion_notices(bootstrap: &str, count: u64) -> Vec<Value> {
    use rdkafka::consumer::Consumer;
    use rdkafka::Message;

    let consumer = support::read_from_start(bootstrap, "notice-reader", "rebeld.checkpoints");
    let mut notices = std::collections::BTreeMap::new();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while (1..=count).any(|v| !notices.contains_key(&v)) && std::time::Instant::now() < until {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(500)) {
            let payload = message.payload().unwrap_or_default();
            let notice: Value = serde_json::from_slice(payload).expect("notice JSON");
            notices.insert(notice["version"].as_u64().expect("version"), notice);
        }
    }
    consumer.unassign().expect("unassign");
    notices.into_values().take(count as usize).collect()
}

#[test]
fn a_version_failing_a_gate_is_kept_as_rejected_and_latest_stays() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = publishing(4, "max_kl = 1e-12\n");
    let config = DaemonConfig::new(dir.path(), &broker.bootstrap, &extra);
    let daemon = Daemon::start(&config);
    replay_hh(&broker.bootstrap, &[]);

    let rejected = |daemon: &Daemon| -> Option<Value> {
        let (_, list) = daemon.api_json("/v1/versions");
        let versions = list["versions"].as_array()?.clone();
        versions.into_iter().find(|v| v["status"] == "rejected")
    };
    wait_for("a rejected version", Duration::from_secs(300), || {
        rejected(&daemon).is_some()
    });
    let version = rejected(&daemon).expect("rejected");
    let reasons = version["reasons"].to_string();
    assert!(reasons.contains("kl_to_latest"), "{version}");
    assert_eq!(latest_version(&daemon), Some(1), "latest must not move");
    let (_, manifest) = daemon.api_json(&format!("/v1/versions/{}", version["version"]));
    assert_eq!(manifest["gates"]["passed"], false);
    let status = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_crash_before_the_completion_marker_leaves_the_previous_version_latest() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = publishing(4, "max_kl = 1e9\nmax_accuracy_drop = 1.0\n");
    let config = DaemonConfig::new(dir.path(), &broker.bootstrap, &extra);
    let crashing = [("REBELD_FAILPOINTS", "checkpoint.before_marker@2")];
    let daemon = Daemon::start_with_env(&config, &crashing);
    replay_hh(&broker.bootstrap, &[]);

    let status = daemon.wait_exit(Duration::from_secs(300));
    assert!(!status.success(), "{status:?}");
    let partial = dir.path().join("versions").join("v00000002");
    assert!(
        partial.join("manifest.json").is_file(),
        "files written before the crash"
    );
    assert!(
        !partial.join(rebeld::checkpoint::MARKER_FILE).exists(),
        "the crash came before the marker"
    );

    let quiet = publishing(1_000_000, "publish_every = \"1h\"\n");
    let config = DaemonConfig::new(dir.path(), &broker.bootstrap, &quiet);
    let daemon = Daemon::start(&config);
    assert_eq!(latest_version(&daemon), Some(1));
    let (_, list) = daemon.api_json("/v1/versions");
    let listed: Vec<u64> = list["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter_map(|v| v["version"].as_u64())
        .collect();
    assert_eq!(listed, [1]);
    assert!(!partial.exists(), "the partial version is removed at start");
    let status = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
}
