//! The reliability suite: the real daemon on a real tansu broker under crashes, poison input
//! and hostile HTTP clients. Each scenario prints one machine-readable line,
//! `RELIABILITY scenario=… pass=… produced=… in_buffer=… lost=… duplicated=… versions=…
//! outside_reads=… peak_rss_mb=…`, which `scripts/reliability` gathers into a table.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rebeld::resume::{Generation, BUFFER_FILE};
use sha2::{Digest, Sha256};
use support::{expected_ids, http_get, wait_for, Daemon, DaemonConfig, Tansu, BINARY};

/// What a scenario measured; `None` prints as `-` (not measured by that scenario).
#[derive(Default)]
struct Figures {
    produced: Option<u64>,
    in_buffer: Option<u64>,
    lost: Option<u64>,
    duplicated: Option<u64>,
    versions: Option<u64>,
    outside_reads: Option<u64>,
    peak_rss_mb: u64,
}

impl Figures {
    /// Prints the scenario's line; `pass` is what the scenario's own checks concluded.
    fn report(&self, scenario: &str, pass: bool) {
        let show = |value: Option<u64>| value.map_or("-".to_owned(), |v| v.to_string());
        println!(
            "RELIABILITY scenario={scenario} pass={pass} produced={} in_buffer={} lost={} \
             duplicated={} versions={} outside_reads={} peak_rss_mb={}",
            show(self.produced),
            show(self.in_buffer),
            show(self.lost),
            show(self.duplicated),
            show(self.versions),
            show(self.outside_reads),
            self.peak_rss_mb,
        );
    }
}

/// Samples the daemon's `process_resident_memory_bytes` on a metrics port (whichever daemon
/// listens there) every 100 ms and keeps the largest value.
struct RssWatch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start(metrics_port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(rss) = resident_bytes(metrics_port) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Self {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    /// The largest resident size seen so far, in MiB.
    fn peak_mb(&self) -> u64 {
        self.peak.load(Ordering::Relaxed) / (1 << 20)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn resident_bytes(metrics_port: u16) -> Option<u64> {
    metric_value(metrics_port, "process_resident_memory_bytes ").map(|v| v as u64)
}

/// The value of the unlabelled metric `prefix` (name and a space) on a metrics port.
fn metric_value(metrics_port: u16, prefix: &str) -> Option<f64> {
    let (_, text) = http_get(metrics_port, "/metrics").ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(prefix)?.trim().parse().ok())
}

fn hh_dir() -> PathBuf {
    support::hh_file().parent().expect("HH folder").to_owned()
}

/// `rebeld replay` of one HH-RLHF file at `rate` events per second; the events it sent.
fn replay_file(bootstrap: &str, file: &Path, rate: u32) -> u64 {
    let output = Command::new(BINARY)
        .arg("replay")
        .arg(file)
        .args(["--format", "hh-rlhf", "--quiet", "--brokers", bootstrap])
        .args(["--rate", &rate.to_string()])
        .output()
        .expect("run rebeld replay");
    assert!(output.status.success(), "replay failed: {output:?}");
    let report = String::from_utf8_lossy(&output.stdout);
    report
        .split_whitespace()
        .skip_while(|word| *word != "sent")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in the replay report: {report}"))
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("version file")))
}

/// The figures of a run that must end with exactly `expected` in the daemon's last resume
/// generation; then ids missing, rows repeating an id, and ids nobody sent.
fn exactly_once(
    data_dir: &Path,
    expected: &BTreeSet<String>,
    produced: u64,
    rss: &RssWatch,
) -> (Figures, usize, usize, usize) {
    let (held, _) = support::snapshot_contents(data_dir);
    let held_set: BTreeSet<String> = held.iter().cloned().collect();
    let lost = expected.difference(&held_set).count();
    let unexpected = held_set.difference(expected).count();
    let duplicated = held.len() - held_set.len();
    let figures = Figures {
        produced: Some(produced),
        in_buffer: Some(held.len() as u64),
        lost: Some(lost as u64),
        duplicated: Some(duplicated as u64),
        versions: None,
        outside_reads: None,
        peak_rss_mb: rss.peak_mb(),
    };
    (figures, lost, duplicated, unexpected)
}

// ---------------------------------------------------------------------------------------
// Scenario 1: crash anywhere.
// ---------------------------------------------------------------------------------------

/// Training and publishing often on the tiny model, so that crashes land in every phase.
const CRASHING: &str = "[runtime]\ntorch_threads = 1\nshutdown_timeout = \"180s\"\n\
                        [train]\nmin_pairs = 16\nbatch_size = 4\nmicro_batch_size = 4\n\
                        learning_rate = 1e-3\nwarmup_steps = 0\n\
                        [checkpoint]\npublish_every_steps = 2\nmin_new_pairs = 4\n\
                        holdout_fraction = 0.2\ndtype = \"f32\"\nmax_kl = 1e9\n\
                        max_accuracy_drop = 1.0\nkeep_versions = 1000\n";

/// One way a run ends: SIGKILL after a delay, or a crash point's abort.
#[derive(Debug)]
enum Crash {
    Kill(Duration),
    Failpoint(&'static str, u32),
}

impl Crash {
    fn random(rng: &mut impl Rng) -> Self {
        match rng.random_range(0..4) {
            0 => Self::Kill(Duration::from_millis(rng.random_range(300..6000))),
            1 => Self::Failpoint("checkpoint.before_marker", rng.random_range(1..3)),
            2 => Self::Failpoint("resume.before_marker", rng.random_range(1..4)),
            _ => Self::Failpoint("publish.after_commit", rng.random_range(1..3)),
        }
    }
}

/// `rebeld run` started directly (not through [`Daemon`], which expects the start-up line:
/// a crash point may abort the process before it logs it); its log goes to a file.
struct Run {
    child: Child,
}

/// A scenario that panics mid-run still stops its daemon instead of leaving it to run on.
impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Run {
    fn start(config: &DaemonConfig, env: &[(&str, String)], cycle: usize) -> Self {
        std::fs::create_dir_all(&config.data_dir).expect("data dir");
        let path = config.data_dir.join("rebeld.toml");
        std::fs::write(&path, &config.body).expect("write config");
        let log = std::fs::File::create(config.data_dir.join(format!("run-{cycle:02}.log")))
            .expect("log file");
        let child = Command::new(BINARY)
            .args(["run", "--config"])
            .arg(&path)
            .env_remove("LD_LIBRARY_PATH")
            .env("REBELD_LOG", "warn,rebeld=info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn rebeld run");
        Self { child }
    }

    /// Waits up to `limit` for the process to end by itself; true when it did.
    fn exited_within(&mut self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if self.child.try_wait().expect("try_wait").is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status (SIGKILL and a panic after `limit`).
    fn terminate(mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if !self.exited_within(limit) {
            let _ = self.child.kill();
            panic!("rebeld did not stop within {limit:?} of SIGTERM");
        }
        self.child.wait().expect("exit status")
    }
}

/// The last lines of a run's log, for a failure message.
fn log_tail(config: &DaemonConfig, cycle: usize) -> String {
    let log = std::fs::read_to_string(config.data_dir.join(format!("run-{cycle:02}.log")));
    let log = log.unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The committed versions on disk (real folders `v` + 8 digits with the marker): number →
/// the manifest.
fn committed_versions(data_dir: &Path) -> BTreeMap<u64, serde_json::Value> {
    let root = data_dir.join("versions");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|entry| {
            let dir = entry.ok()?.path();
            let name = dir.file_name()?.to_str()?.to_owned();
            let number: u64 = name
                .strip_prefix('v')
                .filter(|n| n.len() == 8)?
                .parse()
                .ok()?;
            if !dir.join(rebeld::checkpoint::MARKER_FILE).is_file() {
                return None;
            }
            let manifest = std::fs::read(dir.join(rebeld::checkpoint::MANIFEST_FILE))
                .unwrap_or_else(|e| panic!("{name} has a marker but no manifest: {e}"));
            let manifest = serde_json::from_slice(&manifest).expect("manifest JSON");
            Some((number, manifest))
        })
        .collect()
}

/// Every committed version's files match its manifest's sizes and hashes; the version's
/// weights hash.
fn verify_version(data_dir: &Path, number: u64, manifest: &serde_json::Value) -> String {
    let dir = data_dir.join("versions").join(format!("v{number:08}"));
    assert_eq!(manifest["version"], number, "manifest of v{number}");
    let files = manifest["files"].as_object().expect("files");
    assert!(
        files.contains_key("model.safetensors"),
        "v{number}: {manifest}"
    );
    for (name, entry) in files {
        let path = dir.join(name);
        let size = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("v{number}/{name}: {e}"))
            .len();
        assert_eq!(Some(size), entry["size"].as_u64(), "v{number}/{name} size");
        assert_eq!(
            entry["sha256"].as_str(),
            Some(sha256_file(&path).as_str()),
            "v{number}/{name} is not what its manifest says"
        );
    }
    files["model.safetensors"]["sha256"]
        .as_str()
        .expect("sha256")
        .to_owned()
}

/// The `latest` file of the store, if written.
fn latest_on_disk(data_dir: &Path) -> Option<u64> {
    let text = std::fs::read(data_dir.join("versions").join("latest")).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&text).ok()?;
    value["version"].as_u64()
}

/// What the crash drill checks after every crash and remembers across them.
#[derive(Default)]
struct Ledger {
    weights: BTreeMap<u64, String>,
    latest: u64,
    generation: u64,
    generations_checked: u64,
}

impl Ledger {
    /// Checks the store and the resume state as a crash left them.
    fn check(&mut self, data_dir: &Path) {
        for (number, manifest) in committed_versions(data_dir) {
            let sha = verify_version(data_dir, number, &manifest);
            let parent = manifest["parent"].as_u64();
            assert!(parent.is_none_or(|p| p < number), "v{number}: {manifest}");
            let known = self.weights.entry(number).or_insert_with(|| sha.clone());
            assert_eq!(
                *known, sha,
                "version number {number} reused with other weights"
            );
        }
        if let Some(latest) = latest_on_disk(data_dir) {
            assert!(
                latest >= self.latest,
                "latest went back from {}",
                self.latest
            );
            assert!(
                self.weights.contains_key(&latest),
                "latest v{latest} is not committed"
            );
            self.latest = latest;
        }
        if let Some(generation) = newest_generation(data_dir) {
            assert!(
                generation.number >= self.generation,
                "resume generation went back"
            );
            self.generation = generation.number;
            check_generation(&generation);
            self.generations_checked += 1;
        }
    }
}

fn newest_generation(data_dir: &Path) -> Option<Generation> {
    let root = data_dir.join("resume");
    std::fs::read_dir(&root)
        .ok()?
        .filter_map(|entry| {
            let dir = entry.ok()?.path();
            let number = dir.file_name()?.to_str()?.strip_prefix('g')?.parse().ok()?;
            dir.join(rebeld::resume::MARKER_FILE)
                .is_file()
                .then_some(Generation { number, dir })
        })
        .max_by_key(|generation| generation.number)
}

/// A generation's buffer holds every id once and its training counts add up to the pairs
/// its weights were trained on.
fn check_generation(generation: &Generation) {
    let progress = generation.progress().expect("trainer.json");
    let (buffer, _) =
        rebeld::buffer::read_snapshot(generation.file(BUFFER_FILE)).expect("buffer snapshot");
    let records = buffer.to_records().expect("records");
    let trained: u64 = records.iter().map(|r| u64::from(r.times_trained)).sum();
    assert_eq!(
        trained, progress.pairs_trained,
        "generation {}: training counts against trainer.json",
        generation.number
    );
    let unique: BTreeSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        unique.len(),
        records.len(),
        "generation {}",
        generation.number
    );
}

#[test]
fn scenario_crash_anywhere() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // A dedup window of one id: a message applied twice shows in the buffer as a duplicate
    // instead of being hidden by the window.
    let extra = format!("{CRASHING}[buffer]\ndedup_window = 1\n");
    let config = DaemonConfig::new(&data, &broker.bootstrap, &extra);
    let files = [
        hh_dir().join("harmless-base-test.jsonl.gz"),
        hh_dir().join("helpful-base-test.jsonl.gz"),
        hh_dir().join("helpful-online-test.jsonl.gz"),
    ];
    let expected: Vec<String> = files.iter().flat_map(|f| expected_ids(f)).collect();
    let expected_set: BTreeSet<String> = expected.iter().cloned().collect();
    assert_eq!(
        expected.len(),
        expected_set.len(),
        "the files share or repeat events"
    );

    let replay = {
        let bootstrap = broker.bootstrap.clone();
        let files = files.clone();
        std::thread::spawn(move || files.iter().map(|f| replay_file(&bootstrap, f, 120)).sum())
    };
    let rss = RssWatch::start(config.metrics_port);
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let mut ledger = Ledger::default();
    let mut by_failpoint = 0;
    for cycle in 0..20 {
        let crash = Crash::random(&mut rng);
        match crash {
            Crash::Kill(after) => {
                let run = Run::start(&config, &[], cycle);
                std::thread::sleep(after);
                run.kill();
            }
            Crash::Failpoint(point, hit) => {
                let spec = [(rebeld::failpoint::ENV, format!("{point}@{hit}"))];
                let mut run = Run::start(&config, &spec, cycle);
                // Not reached within 40 s (a slow machine): the run ends as a SIGKILL.
                if run.exited_within(Duration::from_secs(40)) {
                    by_failpoint += 1;
                }
                run.kill();
            }
        }
        ledger.check(&data);
    }
    let produced: u64 = replay.join().expect("replay thread");
    assert_eq!(produced, expected.len() as u64);

    // The last run stops cleanly; on a loaded machine the trainer may need long to finish
    // its step and write the final generation, hence the long shutdown timeout.
    let last = 20;
    let run = Run::start(&config, &[], last);
    let rows = || metric_value(config.metrics_port, "rebeld_buffer_rows ");
    wait_for(
        "every event in the buffer",
        Duration::from_secs(600),
        || rows() == Some(expected.len() as f64),
    );
    let status = run.terminate(Duration::from_secs(200));
    assert!(status.success(), "{status:?}\n{}", log_tail(&config, last));
    ledger.check(&data);

    let (figures, lost, duplicated, unexpected) =
        exactly_once(&data, &expected_set, produced, &rss);
    let figures = Figures {
        versions: Some(ledger.weights.len() as u64),
        ..figures
    };
    let pass = lost == 0 && duplicated == 0 && unexpected == 0;
    figures.report("crash_anywhere", pass);
    eprintln!(
        "crash_anywhere: {by_failpoint} of 20 runs ended at a crash point, {} generations \
         checked, latest v{}",
        ledger.generations_checked, ledger.latest
    );
    assert_eq!(lost, 0, "events lost");
    assert_eq!(duplicated, 0, "events held twice");
    assert_eq!(unexpected, 0, "ids that were never sent");
    assert!(by_failpoint > 0, "no crash point was reached");
    assert!(ledger.weights.len() >= 2, "versions were published");
}

/// A crash point between the first version's commit and its promotion leaves a committed
/// version but no latest; the next start publishes the initial model again and promotes it,
/// so there is something to serve without waiting for training.
#[test]
fn a_crash_between_the_first_commit_and_its_promotion_is_redone_at_the_next_start() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let quiet = "[checkpoint]\npublish_every = \"1h\"\ndtype = \"f32\"\n";
    let config = DaemonConfig::new(dir.path(), &broker.bootstrap, quiet);
    let spec = [(rebeld::failpoint::ENV, "publish.after_commit@1".to_owned())];
    let mut run = Run::start(&config, &spec, 0);
    assert!(
        run.exited_within(Duration::from_secs(120)),
        "{}",
        log_tail(&config, 0)
    );
    run.kill();
    let committed = committed_versions(dir.path());
    assert_eq!(committed.keys().copied().collect::<Vec<_>>(), [1]);
    assert_eq!(latest_on_disk(dir.path()), None);

    let daemon = Daemon::start(&config);
    wait_for("a latest version", Duration::from_secs(120), || {
        daemon.api_json("/v1/versions/latest").0 == 200
    });
    let (_, manifest) = daemon.api_json("/v1/versions/latest");
    assert_eq!(manifest["version"], 2, "{manifest}");
    let weights = |m: &serde_json::Value| m["files"]["model.safetensors"]["sha256"].clone();
    assert_eq!(
        weights(&manifest),
        weights(&committed[&1]),
        "the initial model again"
    );
    let status = daemon.terminate(Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
}

// ---------------------------------------------------------------------------------------
// Scenario 2: poison input.
// ---------------------------------------------------------------------------------------

/// Strict objectives and long prompts dropped, so that every reason the tiny model allows can
/// fire; the default 1 MB message limit.
const STRICT: &str = "[model]\nprompt_too_long = \"drop\"\n\
                      [train]\nstrict_objectives = true\n[train.mixture]\nhelpful = 1.0\n";

/// One Kafka message: key and value as raw bytes (`None` value: a tombstone).
#[derive(Clone)]
struct Message {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
}

fn good_event(i: usize) -> Vec<u8> {
    format!(
        r#"{{"id":"good-{i}","prompt":"Question {i}?","responses":[{{"text":"Answer A {i}"}},
        {{"text":"Answer B {i}"}}],"preference":0}}"#
    )
    .into_bytes()
}

/// A v1 event around `fields`, with a fresh id.
fn bad_v1(fields: &str) -> Vec<u8> {
    format!(r#"{{"id":"poison",{fields}}}"#).into_bytes()
}

const PAIR: &str = r#""responses":[{"text":"a"},{"text":"b"}],"preference":0"#;

fn scored(a: &str, b: &str) -> Vec<u8> {
    bad_v1(&format!(
        r#""prompt":"hi","responses":[{{"text":"a","scores":{{"helpful":{a}}}}},
        {{"text":"b","scores":{{"helpful":{b}}}}}]"#
    ))
}

/// Values that are not JSON the event contract accepts, each with its reason.
fn poison_values() -> Vec<(Vec<u8>, &'static str)> {
    let ten_mb = "x".repeat(10 << 20);
    let mut cases: Vec<(Vec<u8>, &'static str)> = vec![
        (Vec::new(), "empty_message"),
        (
            bad_v1(&format!(r#""prompt":"{ten_mb}",{PAIR}"#)),
            "too_large",
        ),
        (ten_mb.clone().into_bytes(), "too_large"),
        (vec![0xff; 2 << 20], "too_large"),
        (b"{\"\xff\xfe\":1}".to_vec(), "invalid_utf8"),
        (
            [
                b"{\"id\":\"p\",\"prompt\":\"caf\xe9\",".as_slice(),
                PAIR.as_bytes(),
                b"}",
            ]
            .concat(),
            "invalid_utf8",
        ),
        (b"{\"prompt\":\"\xc0\xaf\"}".to_vec(), "invalid_utf8"),
        (b"{\"prompt\":\"\xed\xa0\x80\"}".to_vec(), "invalid_utf8"),
        (b"\x80".to_vec(), "invalid_utf8"),
        (b"{".to_vec(), "invalid_json"),
        (b"not json".to_vec(), "invalid_json"),
        (b"\0".to_vec(), "invalid_json"),
        (format!("{{{PAIR}}} trailing").into_bytes(), "invalid_json"),
        (
            bad_v1(&format!("\"prompt\":\"a\u{1}b\",{PAIR}")),
            "invalid_json",
        ),
        (
            bad_v1(&format!("\"prompt\":\"tab\there\",{PAIR}")),
            "invalid_json",
        ),
        (
            bad_v1(&format!(r#""prompt":"hi","confidence":NaN,{PAIR}"#)),
            "invalid_json",
        ),
        (
            bad_v1(&format!(r#""prompt":"hi","prompt":"yo",{PAIR}"#)),
            "invalid_json",
        ),
        (
            bad_v1(&format!(
                r#""prompt":"hi","x":{}{},{PAIR}"#,
                "[".repeat(129),
                "]".repeat(129)
            )),
            "invalid_json",
        ),
        (
            format!("{}{}", r#"{"a":"#.repeat(100_000), "}".repeat(100_000)).into_bytes(),
            "invalid_json",
        ),
        (b"[1,2]".to_vec(), "wrong_type"),
        (b"\"event\"".to_vec(), "wrong_type"),
        (b"42".to_vec(), "wrong_type"),
        (b"null".to_vec(), "wrong_type"),
        (
            format!(r#"{{"id":7,"prompt":"hi",{PAIR}}}"#).into_bytes(),
            "wrong_type",
        ),
        (bad_v1(&format!(r#""prompt":5,{PAIR}"#)), "wrong_type"),
        (
            bad_v1(r#""prompt":"hi","responses":{},"preference":0"#),
            "wrong_type",
        ),
        (
            bad_v1(r#""prompt":"hi","responses":[{"text":"a"},{"text":"b"}],"preference":true"#),
            "wrong_type",
        ),
        (bad_v1(r#""prompt":"hi""#), "missing_field"),
        (
            bad_v1(r#""prompt":"hi","responses":[{"text":"a"},{"text":"b"}]"#),
            "missing_field",
        ),
        (
            br#"{"chosen":"a","rejected":"b"}"#.to_vec(),
            "missing_field",
        ),
        (
            bad_v1(r#""prompt":"hi","responses":[{"text":"a"}],"preference":0"#),
            "bad_shape",
        ),
        (bad_v1(PAIR), "bad_shape"),
        (br#"{"prompt":"hi","chosen":"a"}"#.to_vec(), "bad_shape"),
        (
            format!(r#"{{"id":"",{PAIR},"prompt":"hi"}}"#).into_bytes(),
            "bad_id",
        ),
        (
            format!(r#"{{"id":"{}","prompt":"hi",{PAIR}}}"#, "i".repeat(129)).into_bytes(),
            "bad_id",
        ),
        (
            bad_v1(&format!(r#""time":"yesterday","prompt":"hi",{PAIR}"#)),
            "bad_time",
        ),
        (
            bad_v1(&format!(r#""time":1e30,"prompt":"hi",{PAIR}"#)),
            "bad_time",
        ),
        (
            bad_v1(&format!(r#""time":-1e300,"prompt":"hi",{PAIR}"#)),
            "bad_time",
        ),
        (
            bad_v1(&format!(r#""prompt":" \n\t ",{PAIR}"#)),
            "empty_text",
        ),
        (
            bad_v1(r#""prompt":"hi","responses":[{"text":""},{"text":"b"}],"preference":0"#),
            "empty_text",
        ),
        (
            bad_v1(&format!(
                r#""messages":[{{"role":"wizard","content":"x"}}],{PAIR}"#
            )),
            "unknown_role",
        ),
        (
            bad_v1(r#""prompt":"hi","responses":[{"text":"same"},{"text":"same"}],"preference":0"#),
            "identical_responses",
        ),
        (
            bad_v1(r#""prompt":"hi","responses":[{"text":"a"},{"text":"b"}],"preference":2"#),
            "bad_preference",
        ),
        (
            bad_v1(r#""prompt":"hi","responses":[{"text":"a"},{"text":"b"}],"preference":-1"#),
            "bad_preference",
        ),
        (
            bad_v1(r#""prompt":"hi","responses":[{"text":"a"},{"text":"b"}],"preference":"a""#),
            "bad_preference",
        ),
        (scored("1e400", "1"), "non_finite_score"),
        (scored("1", "-1e999"), "non_finite_score"),
        (
            bad_v1(concat!(
                r#""prompt":"hi","responses":[{"text":"a","scores":{"novelty":1}},"#,
                r#"{"text":"b","scores":{"novelty":2}}]"#
            )),
            "unknown_objective",
        ),
        (
            bad_v1(concat!(
                r#""prompt":"hi","responses":[{"text":"a","policy_version":-1},"#,
                r#"{"text":"b"}],"preference":0"#
            )),
            "bad_policy_version",
        ),
        (
            bad_v1(concat!(
                r#""prompt":"hi","responses":[{"text":"a","policy_version":1e25},"#,
                r#"{"text":"b"}],"preference":0"#
            )),
            "bad_policy_version",
        ),
        (
            bad_v1(&format!(r#""prompt":"hi","confidence":0.5,{PAIR}"#)),
            "bad_confidence",
        ),
        (
            bad_v1(&format!(r#""prompt":"hi","confidence":1e308,{PAIR}"#)),
            "bad_confidence",
        ),
        (
            bad_v1(&format!(
                r#""prompt":"{}",{PAIR}"#,
                "hello ".repeat(100_000)
            )),
            "prompt_too_long",
        ),
    ];
    cases.shrink_to_fit();
    cases
}

/// Every poison message (tombstone first, then the values, some with keys that are not UTF-8),
/// each with the reason it must be dead-lettered for.
fn poison() -> Vec<(Message, &'static str)> {
    let mut all = vec![(
        Message {
            key: None,
            value: None,
        },
        "empty_message",
    )];
    for (i, (value, reason)) in poison_values().into_iter().enumerate() {
        let key = match i % 3 {
            0 => None,
            1 => Some(vec![0xc3, 0x28, b'k', i as u8]),
            _ => Some(format!("key-{i}").into_bytes()),
        };
        all.push((
            Message {
                key,
                value: Some(value),
            },
            reason,
        ));
    }
    all
}

fn producer(bootstrap: &str) -> rdkafka::producer::FutureProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("message.max.bytes", "20000000")
        .create()
        .expect("producer")
}

/// Produces the messages to partition 0, in order; each one's offset.
fn produce(bootstrap: &str, messages: &[Message]) -> Vec<i64> {
    use rdkafka::producer::FutureRecord;
    let producer = producer(bootstrap);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut offsets = Vec::new();
        for message in messages {
            let mut record = FutureRecord::<[u8], [u8]>::to(support::TOPIC).partition(0);
            if let Some(key) = &message.key {
                record = record.key(key);
            }
            if let Some(value) = &message.value {
                record = record.payload(value);
            }
            let delivery = producer
                .send(record, Duration::from_secs(60))
                .await
                .unwrap_or_else(|(e, _)| panic!("delivery: {e}"));
            offsets.push(delivery.offset);
        }
        offsets
    })
}

/// A dead letter as read back: its reason and the original key and value.
struct DeadLetter {
    reason: String,
    omitted: Option<String>,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
}

/// Reads the dead-letter topic until `count` letters arrived, by source offset.
fn dead_letters(bootstrap: &str, count: usize) -> BTreeMap<i64, DeadLetter> {
    use rdkafka::message::{Headers, Message as _};
    let consumer = support::read_from_start(bootstrap, "poison-reader", support::DEAD_LETTER_TOPIC);
    let mut letters = BTreeMap::new();
    wait_for("the dead letters", Duration::from_secs(120), || {
        while let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let header = |name: &str| {
                let value = message.headers()?.iter().find(|h| h.key == name)?.value?;
                Some(String::from_utf8_lossy(value).into_owned())
            };
            let offset = header("rebeld.source.offset").and_then(|o| o.parse().ok());
            let letter = DeadLetter {
                reason: header("rebeld.reason").expect("reason header"),
                omitted: header("rebeld.omitted"),
                key: message.key().map(<[u8]>::to_vec),
                value: message.payload().map(<[u8]>::to_vec),
            };
            letters.insert(offset.expect("offset header"), letter);
        }
        letters.len() >= count
    });
    letters
}

/// The letter carries the message byte for byte, except a value over the daemon's producer
/// limit (twice the 1 MB default `kafka.max_message_bytes`), which it says it left out.
fn carried(message: &Message, letter: &DeadLetter) -> bool {
    let oversized = message.value.as_ref().is_some_and(|v| v.len() > 2_000_000);
    let value_ok = if oversized {
        letter.omitted.as_deref() == Some("value") && letter.value.is_none()
    } else {
        letter.omitted.is_none() && letter.value == message.value
    };
    value_ok && letter.key == message.key
}

#[test]
fn scenario_poison_input() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = DaemonConfig::new(dir.path(), &broker.bootstrap, STRICT);
    let daemon = Daemon::start(&config);
    let rss = RssWatch::start(config.metrics_port);
    wait_for("a first memory sample", Duration::from_secs(30), || {
        rss.peak_mb() > 0
    });
    let baseline = rss.peak_mb();

    let bad = poison();
    let reasons: BTreeSet<&str> = bad.iter().map(|(_, reason)| *reason).collect();
    assert!(bad.len() >= 50, "{} poison messages", bad.len());
    let mut messages = Vec::new();
    for (i, (message, _)) in bad.iter().enumerate() {
        let key = (i % 2 == 0).then(|| vec![0xfe, b'g', i as u8]);
        messages.push(Message {
            key,
            value: Some(good_event(i)),
        });
        messages.push(message.clone());
    }
    messages.push(Message {
        key: None,
        value: Some(good_event(bad.len())),
    });
    let offsets = produce(&broker.bootstrap, &messages);
    let goods = bad.len() + 1;

    wait_for(
        "every good event accepted",
        Duration::from_secs(180),
        || daemon.metric("rebeld_ingest_accepted_total") == Some(goods as f64),
    );
    let letters = dead_letters(&broker.bootstrap, bad.len());
    let status = daemon.terminate(Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
    let (held, _) = support::snapshot_contents(dir.path());

    let mut wrong = Vec::new();
    for (i, (message, reason)) in bad.iter().enumerate() {
        match letters.get(&offsets[2 * i + 1]) {
            Some(letter) if letter.reason == *reason && carried(message, letter) => {}
            Some(letter) => wrong.push(format!(
                "case {i} ({reason}): got {} (omitted {:?})",
                letter.reason, letter.omitted
            )),
            None => wrong.push(format!("case {i} ({reason}): no dead letter")),
        }
    }
    let held_set: BTreeSet<&str> = held.iter().map(String::as_str).collect();
    let wanted: Vec<String> = (0..goods).map(|i| format!("good-{i}")).collect();
    let lost = wanted
        .iter()
        .filter(|id| !held_set.contains(id.as_str()))
        .count();
    let peak = rss.peak_mb();
    let lost = lost + bad.len().saturating_sub(letters.len());
    let duplicated = held.len() - held_set.len();
    let figures = Figures {
        produced: Some(messages.len() as u64),
        in_buffer: Some(held.len() as u64),
        lost: Some(lost as u64),
        duplicated: Some(duplicated as u64),
        versions: None,
        outside_reads: None,
        peak_rss_mb: peak,
    };
    let bounded = peak <= baseline + 256;
    let pass = wrong.is_empty() && lost == 0 && duplicated == 0 && bounded;
    figures.report("poison_input", pass);
    eprintln!(
        "poison_input: {} poison messages over {} reasons, resident {baseline} MB at start, \
         {peak} MB at most",
        bad.len(),
        reasons.len()
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(
        letters.len(),
        bad.len(),
        "one dead letter per poison message"
    );
    assert_eq!(lost, 0, "good events or dead letters lost");
    assert_eq!(duplicated, 0, "good events held twice");
    assert_eq!(held.len(), goods, "only the good events are held");
    assert!(
        bounded,
        "resident memory grew from {baseline} MB to {peak} MB"
    );
}

// ---------------------------------------------------------------------------------------
// Scenario 4: hostile HTTP.
// ---------------------------------------------------------------------------------------

const READ_TOKEN: &str = "reader-7c1f";
const ADMIN_TOKEN: &str = "admin-93ab";

/// An answer read off a raw connection.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// Sends `request` as it is on a new connection and reads until the server closes it.
fn raw(port: u16, request: &[u8]) -> std::io::Result<Answer> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.write_all(request)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(parse_answer(&response))
}

fn parse_answer(response: &[u8]) -> Answer {
    let split = response.windows(4).position(|w| w == b"\r\n\r\n");
    let head = String::from_utf8_lossy(&response[..split.unwrap_or(response.len())]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = split.map_or_else(Vec::new, |at| response[at + 4..].to_vec());
    Answer { status, body }
}

/// A GET with the read token (or `authorization` as given, when not empty).
fn get(port: u16, target: &str, authorization: Option<&str>, extra: &str) -> Answer {
    let auth = authorization.map_or_else(
        || format!("Authorization: Bearer {READ_TOKEN}\r\n"),
        |value| {
            if value.is_empty() {
                String::new()
            } else {
                format!("{value}\r\n")
            }
        },
    );
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}{extra}Connection: close\r\n\r\n"
    );
    // A connection the server cut (after an oversized request, say) reads as status 0.
    raw(port, request.as_bytes()).unwrap_or(Answer {
        status: 0,
        body: Vec::new(),
    })
}

/// The server still answers an ordinary authorized request correctly.
fn still_serving(port: u16, config_json: &[u8]) {
    let answer = get(port, "/v1/versions/1/files/config.json", None, "");
    assert_eq!(answer.status, 200);
    assert!(
        answer.body == config_json,
        "config.json served as committed"
    );
}

/// Files outside any version, each holding the canary text, placed where a traversal, a
/// symlink or an unmarked folder could reach them.
fn plant_canaries(data_dir: &Path, canary: &str) {
    let versions = data_dir.join("versions");
    let outside = data_dir.join("outside");
    std::fs::create_dir_all(&outside).expect("outside");
    for path in [
        data_dir.join("canary.txt"),
        versions.join("canary.txt"),
        outside.join("canary.txt"),
        outside.join("config.json"),
    ] {
        std::fs::write(&path, canary).expect("canary");
    }
    // A version-looking symlink to a folder outside, complete with a manifest and a marker.
    let manifest =
        std::fs::read(versions.join("v00000001").join("manifest.json")).expect("manifest of v1");
    std::fs::write(outside.join("manifest.json"), &manifest).expect("manifest");
    std::fs::write(outside.join(rebeld::checkpoint::MARKER_FILE), "").expect("marker");
    std::os::unix::fs::symlink(&outside, versions.join("v00000077")).expect("symlink");
    // A folder with the version layout but no completion marker.
    let unmarked = versions.join("v00000078");
    std::fs::create_dir_all(&unmarked).expect("unmarked");
    std::fs::write(unmarked.join("manifest.json"), &manifest).expect("manifest");
    std::fs::write(unmarked.join("config.json"), canary).expect("canary");
    // A symlink inside the real version, to a file outside.
    let link = versions.join("v00000001").join("canary.txt");
    std::os::unix::fs::symlink(data_dir.join("canary.txt"), link).expect("symlink");
}

/// Targets that try to leave the versions: traversal in every encoding, links, odd numbers.
fn traversals() -> Vec<String> {
    let names = [
        "../../canary.txt",
        "..%2F..%2Fcanary.txt",
        "..%2f..%2f..%2fcanary.txt",
        "%2e%2e%2f%2e%2e%2fcanary.txt",
        "%2E%2E/%2E%2E/canary.txt",
        "%252e%252e%252fcanary.txt",
        "..%5c..%5ccanary.txt",
        "..\\..\\canary.txt",
        "....//....//canary.txt",
        "%c0%ae%c0%ae%c0%afcanary.txt",
        "%e0%80%ae%e0%80%ae/canary.txt",
        "..%u2215canary.txt",
        "%2Fetc%2Fpasswd",
        "canary.txt",
        "canary.txt%00config.json",
        "config.json%00",
        "config.json%2F..%2F..%2Fcanary.txt",
        ".%2Fcanary.txt",
        "%2e%2e",
        ".complete",
        "manifest.json%2F..%2F..%2F..%2Fcanary.txt",
    ];
    let mut targets: Vec<String> = names
        .iter()
        .map(|name| format!("/v1/versions/1/files/{name}"))
        .collect();
    targets.extend(
        [
            "/v1/versions/1/../../canary.txt",
            "/v1/versions/1/files/../../../canary.txt",
            "/v1/versions/%2e%2e/files/canary.txt",
            "/v1/versions/..%2F..%2F/files/canary.txt",
            "/v1/versions/77/files/canary.txt",
            "/v1/versions/77/files/config.json",
            "/v1/versions/78/files/config.json",
            "/v1/versions/00000077/files/config.json",
            "/v1/versions/-1/files/config.json",
            "/v1/versions/99999999999999999999999/files/config.json",
            "/v1/versions/1%2F..%2F77/files/config.json",
            "/v1/versions/77",
            "/canary.txt",
            "/../canary.txt",
            "//canary.txt",
            "http://127.0.0.1/../canary.txt",
            "/v1/versions/1/files/%2e%2e%2f%2e%2e%2fversions%2fcanary.txt",
        ]
        .map(str::to_owned),
    );
    targets
}

/// Many connections that never send a byte, open while the server answers others.
/// How long the trainer's step time is averaged over, idle and under attack.
const STEP_WINDOW: Duration = Duration::from_secs(15);

/// The trainer's mean step time over the next `window`, from the step-duration histogram;
/// `None` when no step ended in it.
fn mean_step_seconds(daemon: &Daemon, window: Duration) -> Option<f64> {
    let read = || {
        let sum = daemon.metric("rebeld_train_step_duration_seconds_sum")?;
        let count = daemon.metric("rebeld_train_step_duration_seconds_count")?;
        Some((sum, count))
    };
    let (sum_before, count_before) = read()?;
    std::thread::sleep(window);
    let (sum_after, count_after) = read()?;
    (count_after > count_before).then(|| (sum_after - sum_before) / (count_after - count_before))
}

fn seconds(value: Option<f64>) -> String {
    value.map_or("-".to_owned(), |s| format!("{:.1} ms", s * 1e3))
}

fn idle_connections(port: u16, count: usize) -> Vec<std::net::TcpStream> {
    (0..count)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect()
}

/// A client that sends its headers one byte every 50 ms; what it got in the end.
fn trickle(port: u16) -> std::thread::JoinHandle<Option<u16>> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .ok()?;
        let request = format!(
            "GET /v1/versions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: {}\r\n\
             Authorization: Bearer {READ_TOKEN}\r\nConnection: close\r\n\r\n",
            "s".repeat(60)
        );
        for byte in request.as_bytes() {
            if stream.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        Some(parse_answer(&response).status)
    })
}

#[test]
fn scenario_hostile_http() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // The trainer steps throughout (on 200 pairs, publishing nothing after version 1), so
    // that its step time can be compared with and without the attacks.
    let extra = format!(
        "[server]\nread_tokens = [\"{READ_TOKEN}\"]\nadmin_tokens = [\"{ADMIN_TOKEN}\"]\n\
         max_long_poll = \"3s\"\n[runtime]\ntorch_threads = 1\n\
         [train]\nmin_pairs = 8\nbatch_size = 8\nmicro_batch_size = 8\n\
         [checkpoint]\npublish_every_steps = 0\npublish_every = \"1h\"\n"
    );
    let config = DaemonConfig::new(&data, &broker.bootstrap, &extra);
    let daemon = Daemon::start(&config);
    let rss = RssWatch::start(config.metrics_port);
    let port = daemon.api_port;
    wait_for("version 1", Duration::from_secs(120), || {
        get(port, "/v1/versions/latest", None, "").status == 200
    });
    let training: Vec<Message> = (0..200)
        .map(|i| Message {
            key: None,
            value: Some(good_event(i)),
        })
        .collect();
    produce(&broker.bootstrap, &training);
    wait_for("training steps", Duration::from_secs(120), || {
        daemon
            .metric("rebeld_train_steps_total")
            .is_some_and(|n| n >= 5.0)
    });
    let idle_step = mean_step_seconds(&daemon, STEP_WINDOW);
    let config_json = std::fs::read(data.join("versions/v00000001/config.json")).expect("v1");
    let canary = format!("CANARY-{}", std::process::id());
    plant_canaries(&data, &canary);

    let mut outside_reads = 0u64;
    let mut failures = Vec::new();
    let mut check = |what: &str, answer: &Answer, allowed: &[u16]| {
        if answer
            .body
            .windows(canary.len())
            .any(|w| w == canary.as_bytes())
        {
            outside_reads += answer.body.len() as u64;
        }
        if !allowed.contains(&answer.status) {
            failures.push(format!("{what}: status {}", answer.status));
        }
    };

    // Tokens: missing, wrong, malformed, huge, and a read token on an admin route.
    let file = "/v1/versions/1/files/config.json";
    for auth in [
        "",
        "Authorization: Bearer wrong",
        "Authorization: Bearer",
        "Authorization: Basic cmVhZGVyOnB3",
        "Authorization: bearer",
        &format!("Authorization: Bearer {READ_TOKEN}x"),
        &format!(
            "Authorization: Bearer {}",
            &READ_TOKEN[..READ_TOKEN.len() - 1]
        ),
        &format!("Authorization: Bearer {}", "t".repeat(6000)),
    ] {
        check(
            &format!("token {:.40}", auth),
            &get(port, file, Some(auth), ""),
            &[401],
        );
    }
    let control = get(port, file, Some("Authorization: Bearer \u{1}"), "");
    check("token with a control character", &control, &[400, 401]);
    let promote = format!(
        "POST /v1/versions/1/promote HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READ_TOKEN}\
         \r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    check(
        "read token, admin route",
        &raw(port, promote.as_bytes()).expect("promote"),
        &[403],
    );

    // Traversal, links and folders without a marker: never a file outside a version.
    for target in traversals() {
        let answer = get(port, &target, None, "");
        check(&format!("GET {target}"), &answer, &[400, 404, 405]);
    }
    still_serving(port, &config_json);

    // Ranges past the end and odd ranges.
    let size = config_json.len();
    for (range, allowed) in [
        (format!("bytes={size}-"), &[416][..]),
        (format!("bytes={}-{}", size + 10, size + 20), &[416][..]),
        ("bytes=18446744073709551615-".to_owned(), &[416][..]),
        ("bytes=99999999999999999999999-".to_owned(), &[200][..]),
        ("bytes=-0".to_owned(), &[416][..]),
        ("bytes=5-2".to_owned(), &[200][..]),
        ("bytes=0-18446744073709551615".to_owned(), &[206][..]),
        ("bytes=-99999999".to_owned(), &[206][..]),
        ("bytes=0-0,5-".to_owned(), &[200][..]),
        ("items=0-5".to_owned(), &[200][..]),
    ] {
        let answer = get(port, file, None, &format!("Range: {range}\r\n"));
        let whole_or_part = answer.status == 416
            || config_json
                .windows(answer.body.len().max(1))
                .any(|w| w == answer.body);
        assert!(
            whole_or_part,
            "Range {range}: a body that is not part of the file"
        );
        check(&format!("Range {range}"), &answer, allowed);
    }

    // Oversized headers: one huge value, then very many headers.
    let huge = format!("X-Huge: {}\r\n", "h".repeat(1 << 20));
    check("1 MB header", &get(port, file, None, &huge), &[0, 400, 431]);
    let many: String = (0..20_000).map(|i| format!("X-H{i}: v\r\n")).collect();
    check(
        "20,000 headers",
        &get(port, file, None, &many),
        &[0, 400, 431],
    );
    still_serving(port, &config_json);

    // Idle connections, a client trickling its headers and many long polls, all at once,
    // for as long as the step time is measured.
    let idle = idle_connections(port, 300);
    let slow = trickle(port);
    let stop_polls = Arc::new(AtomicBool::new(false));
    let polls: Vec<_> = (0..100)
        .map(|_| {
            let stop = stop_polls.clone();
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                while statuses.is_empty() || !stop.load(Ordering::Relaxed) {
                    statuses
                        .push(get(port, "/v1/versions/latest?after=1&wait=3s", None, "").status);
                }
                statuses
            })
        })
        .collect();
    still_serving(port, &config_json);
    let attacked_step = mean_step_seconds(&daemon, STEP_WINDOW);
    stop_polls.store(true, Ordering::Relaxed);
    let statuses: Vec<u16> = polls
        .into_iter()
        .flat_map(|p| p.join().expect("poll"))
        .collect();
    for status in &statuses {
        check(
            "long poll",
            &Answer {
                status: *status,
                body: Vec::new(),
            },
            &[204],
        );
    }
    let slow_status = slow.join().expect("slow client");
    check(
        "slow client",
        &Answer {
            status: slow_status.unwrap_or(0),
            body: Vec::new(),
        },
        &[0, 200, 408],
    );
    still_serving(port, &config_json);
    drop(idle);
    still_serving(port, &config_json);
    let health = get(port, "/healthz", Some(""), "");
    check("healthz afterwards", &health, &[200]);

    let figures = Figures {
        outside_reads: Some(outside_reads),
        peak_rss_mb: rss.peak_mb(),
        ..Figures::default()
    };
    let pass = failures.is_empty() && outside_reads == 0;
    figures.report("hostile_http", pass);
    eprintln!(
        "hostile_http: slow client got {slow_status:?}; {} long polls; mean step {} idle, {} \
         under attack ({}; measured, not asserted: timing belongs to benchmarks)",
        statuses.len(),
        seconds(idle_step),
        seconds(attacked_step),
        match (idle_step, attacked_step) {
            (Some(idle), Some(attacked)) => format!("ratio {:.2}", attacked / idle),
            _ => "no ratio".to_owned(),
        }
    );
    let status = daemon.terminate(Duration::from_secs(60));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(outside_reads, 0, "bytes served from outside the versions");
    assert!(status.success(), "{status:?}");
}

// ---------------------------------------------------------------------------------------
// Scenario 3: non-finite math.
// ---------------------------------------------------------------------------------------

/// Rewards from the `helpful` score, steps often, rollback after two skips in a row, and a
/// version every two applied steps with permissive gates (but `finite_weights`).
const NON_FINITE: &str = "[runtime]\ntorch_threads = 1\nshutdown_timeout = \"180s\"\n\
                          [train]\nmin_pairs = 8\nbatch_size = 8\nmicro_batch_size = 8\n\
                          learning_rate = 1e-3\nwarmup_steps = 0\nmax_consecutive_skips = 2\n\
                          [train.mixture]\nhelpful = 1.0\n\
                          [checkpoint]\npublish_every_steps = 2\nmin_new_pairs = 4\n\
                          holdout_fraction = 0.2\ndtype = \"f32\"\nmax_kl = 1e9\n\
                          max_accuracy_drop = 1.0\nkeep_versions = 1000\n";

/// An event whose responses score `a` and `b` on `helpful`.
fn scored_event(id: &str, a: &str, b: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","prompt":"Rate this {id}","responses":[
        {{"text":"First answer {id}","scores":{{"helpful":{a}}}}},
        {{"text":"Second answer {id}","scores":{{"helpful":{b}}}}}]}}"#
    )
    .into_bytes()
}

/// The sum of a labelled counter over its labels, or one series when `name` carries labels.
fn labelled_sum(metrics_port: u16, name: &str) -> f64 {
    let text = http_get(metrics_port, "/metrics")
        .map(|(_, t)| t)
        .unwrap_or_default();
    // A name with labels names one series: its line starts with it exactly.
    let prefix = match name.ends_with('}') {
        true => format!("{name} "),
        false => format!("{name}{{"),
    };
    text.lines()
        .filter(|line| line.starts_with(&prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every tensor of a safetensors file holds finite numbers only; the tensors read.
fn all_finite(path: &Path) -> Result<usize, String> {
    let tensors = tch::Tensor::read_safetensors(path).map_err(|e| e.to_string())?;
    for (name, tensor) in &tensors {
        let finite = tensor
            .to_kind(tch::Kind::Float)
            .isfinite()
            .all()
            .int64_value(&[]);
        if finite != 1 {
            return Err(format!("{name} holds a non-finite value"));
        }
    }
    Ok(tensors.len())
}

/// The faults `scenario_non_finite_math` injects, by trainer fault point: a NaN reward, an
/// infinite anchor log-prob and a NaN loss once each, then NaN gradients on two steps in a
/// row, which `max_consecutive_skips = 2` answers with a rollback.
const INJECTED_FAULTS: &str =
    "train.nan_reward@3,train.inf_anchor@5,train.nan_loss@7,train.nan_gradient@9-10";

#[test]
fn scenario_non_finite_math() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = DaemonConfig::new(&data, &broker.bootstrap, NON_FINITE);
    let daemon = Daemon::start_with_env(&config, &[("REBELD_FAILPOINTS", INJECTED_FAULTS)]);
    let rss = RssWatch::start(config.metrics_port);

    // Besides the injected faults: scores the contract accepts (finite f64) whose difference
    // is not finite (±1e308 overflows f64) or beyond the trainer's bound (±1e39 in f32).
    let mut messages: Vec<Message> = (0..60)
        .map(|i| Message {
            key: None,
            value: Some(scored_event(&format!("fine-{i}"), "0.9", "0.1")),
        })
        .collect();
    for (i, (a, b)) in [
        ("1e308", "-1e308"),
        ("1.5e308", "-1.7e308"),
        ("1e39", "-1e39"),
    ]
    .iter()
    .enumerate()
    {
        for j in 0..2 {
            let value = scored_event(&format!("overflow-{i}-{j}"), a, b);
            messages.insert(
                10 * (2 * i + j) + 5,
                Message {
                    key: None,
                    value: Some(value),
                },
            );
        }
    }
    produce(&broker.bootstrap, &messages);

    let port = config.metrics_port;
    let skipped_by = |cause: &str| {
        let series = format!("rebeld_train_skipped_steps_total{{cause=\"{cause}\"}}");
        labelled_sum(port, &series)
    };
    wait_for(
        "every injected fault skipped, a rollback, left-out pairs and versions",
        Duration::from_secs(600),
        || {
            skipped_by("non_finite_loss") >= 3.0
                && skipped_by("non_finite_gradient") >= 2.0
                && daemon
                    .metric("rebeld_train_rollbacks_total")
                    .is_some_and(|n| n >= 1.0)
                && daemon
                    .metric("rebeld_train_unusable_pairs_total")
                    .is_some_and(|n| n >= 1.0)
                && committed_versions(&data).len() >= 3
        },
    );
    let skipped = labelled_sum(port, "rebeld_train_skipped_steps_total");
    let rollbacks = daemon.metric("rebeld_train_rollbacks_total").unwrap_or(0.0);
    let left_out = daemon
        .metric("rebeld_train_unusable_pairs_total")
        .unwrap_or(0.0);
    let applied = daemon.metric("rebeld_train_steps_total").unwrap_or(0.0);
    let rows = daemon.metric("rebeld_buffer_rows").unwrap_or(0.0);
    let status = daemon.terminate(Duration::from_secs(200));
    assert!(status.success(), "{status:?}");

    let versions = committed_versions(&data);
    let mut non_finite = Vec::new();
    for (number, manifest) in &versions {
        verify_version(&data, *number, manifest);
        // A version its gates rejected is kept, never served: only published ones count.
        if manifest["gates"]["passed"] != true {
            continue;
        }
        let weights = data
            .join("versions")
            .join(format!("v{number:08}/model.safetensors"));
        if let Err(problem) = all_finite(&weights) {
            non_finite.push(format!("v{number}: {problem}"));
        }
    }
    let generation = newest_generation(&data).expect("a resume generation");
    check_generation(&generation);
    let policy = all_finite(&generation.file("policy.safetensors"));
    let figures = Figures {
        produced: Some(messages.len() as u64),
        in_buffer: Some(rows as u64),
        versions: Some(versions.len() as u64),
        peak_rss_mb: rss.peak_mb(),
        ..Figures::default()
    };
    let pass = non_finite.is_empty() && policy.is_ok() && skipped >= 5.0 && rollbacks >= 1.0;
    figures.report("non_finite_math", pass);
    eprintln!(
        "non_finite_math: {applied} steps applied, {skipped} skipped, {rollbacks} rollbacks, \
         {left_out} pairs left out, {} versions",
        versions.len()
    );
    assert!(non_finite.is_empty(), "{}", non_finite.join("\n"));
    assert!(policy.is_ok(), "resume policy: {policy:?}");
    assert_eq!(
        rows as usize,
        messages.len(),
        "the overflowing events are held, not lost"
    );
}

// ---------------------------------------------------------------------------------------
// Scenario: full disk.
// ---------------------------------------------------------------------------------------

/// Publications 2 to 4 and resume writes 2 to 6 find the disk full; space returns after.
/// The first of each (the initial version, the first resume generation) succeeds.
const DISK_FULL_FAULTS: &str = "checkpoint.disk_full@2-4,resume.disk_full@2-6";

/// A version attempted after every applied step and a resume write every second.
const DISK_FULL: &str = "[runtime]\ntorch_threads = 1\nshutdown_timeout = \"180s\"\n\
                         [buffer]\nsnapshot_every = \"1s\"\n\
                         [train]\nmin_pairs = 8\nbatch_size = 8\nmicro_batch_size = 8\n\
                         warmup_steps = 0\n[train.mixture]\nhelpful = 1.0\n\
                         [checkpoint]\npublish_every_steps = 1\nmin_new_pairs = 1\n\
                         holdout_fraction = 0.2\ndtype = \"f32\"\nmax_kl = 1e9\n\
                         max_accuracy_drop = 1.0\nkeep_versions = 1000\n";

/// A client of the daemon's consumer group that only reads its committed offsets (it never
/// joins the group).
fn group_reader(bootstrap: &str) -> rdkafka::consumer::BaseConsumer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "rebeld")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// The offsets the daemon's consumer group has committed, by partition of the events topic.
fn committed_offsets(reader: &rdkafka::consumer::BaseConsumer) -> BTreeMap<i32, i64> {
    use rdkafka::consumer::Consumer;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

    let mut asked = TopicPartitionList::new();
    for partition in 0..3 {
        asked.add_partition(support::TOPIC, partition);
    }
    let committed = reader
        .committed_offsets(asked, Duration::from_secs(10))
        .expect("committed offsets");
    committed
        .elements()
        .iter()
        .filter_map(|element| match element.offset() {
            Offset::Offset(offset) => Some((element.partition(), offset)),
            _ => None,
        })
        .collect()
}

/// The next offsets held by the newest complete resume generation, by partition; `None`
/// while a generation is being superseded under the reader.
fn durable_offsets(data_dir: &Path) -> Option<BTreeMap<i32, i64>> {
    let generation = newest_generation(data_dir)?;
    let (_, meta) = rebeld::buffer::read_snapshot(generation.file(BUFFER_FILE)).ok()?;
    let offsets = meta
        .next_offsets
        .into_iter()
        .filter(|((topic, _), _)| topic == support::TOPIC)
        .map(|((_, partition), offset)| (partition, offset))
        .collect();
    Some(offsets)
}

/// Partitions whose committed offset is past the newest durable state's, as text. Committed
/// offsets are read first: a generation written in between only moves the bound up.
fn committed_past_durable(
    reader: &rdkafka::consumer::BaseConsumer,
    data_dir: &Path,
) -> Vec<String> {
    let committed = committed_offsets(reader);
    let Some(durable) = durable_offsets(data_dir) else {
        return Vec::new();
    };
    committed
        .into_iter()
        .filter(|(partition, offset)| *offset > durable.get(partition).copied().unwrap_or(0))
        .map(|(partition, offset)| format!("partition {partition}: committed {offset}"))
        .collect()
}

/// Polls the latest version while the disk is full: each answer must be 200 and the number
/// must never go down. Returns how many answers there were and the problems seen.
fn watch_latest(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut answers, mut problems, mut highest) = (0u64, Vec::new(), 0u64);
        while !stop.load(Ordering::Relaxed) {
            match http_get(port, "/v1/versions/latest") {
                Ok((200, body)) => {
                    let manifest: serde_json::Value =
                        serde_json::from_str(&body).unwrap_or_default();
                    let version = manifest["version"].as_u64().unwrap_or(0);
                    if version < highest {
                        problems.push(format!("latest went from v{highest} to v{version}"));
                    }
                    highest = highest.max(version);
                }
                Ok((status, _)) => problems.push(format!("latest answered {status}")),
                Err(error) => problems.push(format!("latest: {error}")),
            }
            answers += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        (answers, problems)
    })
}

#[test]
fn scenario_full_disk() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = DaemonConfig::new(&data, &broker.bootstrap, DISK_FULL);
    let daemon = Daemon::start_with_env(&config, &[("REBELD_FAILPOINTS", DISK_FULL_FAULTS)]);
    let rss = RssWatch::start(config.metrics_port);
    wait_for("the initial version", Duration::from_secs(120), || {
        committed_versions(&data).contains_key(&1)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let latest = watch_latest(config.api_port, stop.clone());

    let messages: Vec<Message> = (0..120)
        .map(|i| Message {
            key: None,
            value: Some(scored_event(&format!("disk-{i}"), "0.9", "0.1")),
        })
        .collect();
    let expected: BTreeSet<String> = (0..120).map(|i| format!("disk-{i}")).collect();
    produce(&broker.bootstrap, &messages);

    let reader = group_reader(&broker.bootstrap);
    let mut past_durable = Vec::new();
    wait_for(
        "failed writes, then a new version and a new resume generation",
        Duration::from_secs(600),
        || {
            past_durable.extend(committed_past_durable(&reader, &data));
            daemon
                .metric("rebeld_checkpoint_publish_failures_total")
                .is_some_and(|n| n >= 3.0)
                && daemon
                    .metric("rebeld_train_resume_write_failures_total")
                    .is_some_and(|n| n >= 5.0)
                && daemon.count_lines("publishing again") >= 1
                && daemon.count_lines("resume state written again") >= 1
                && daemon.metric("rebeld_buffer_rows") == Some(120.0)
        },
    );
    stop.store(true, Ordering::Relaxed);
    let (answers, latest_problems) = latest.join().expect("latest watcher");
    let publish_warnings = daemon.count_lines("publication failed");
    let resume_warnings = daemon.count_lines("cannot write the resume state");
    let status = daemon.terminate(Duration::from_secs(200));
    assert!(status.success(), "{status:?}");

    let versions = committed_versions(&data);
    for (number, manifest) in &versions {
        verify_version(&data, *number, manifest);
    }
    let (mut figures, lost, duplicated, unexpected) =
        exactly_once(&data, &expected, messages.len() as u64, &rss);
    figures.versions = Some(versions.len() as u64);
    let pass = latest_problems.is_empty()
        && past_durable.is_empty()
        && publish_warnings == 1
        && resume_warnings == 1
        && versions.len() >= 2
        && lost == 0
        && duplicated == 0
        && unexpected == 0;
    figures.report("full_disk", pass);
    eprintln!(
        "full_disk: latest answered {answers} times while writes failed; {} versions",
        versions.len()
    );
    assert!(latest_problems.is_empty(), "{latest_problems:?}");
    assert!(
        past_durable.is_empty(),
        "offsets committed past the durable state: {past_durable:?}"
    );
    assert_eq!(
        publish_warnings, 1,
        "one warning for the failed publications"
    );
    assert_eq!(
        resume_warnings, 1,
        "one warning for the failed resume writes"
    );
    assert!(
        versions.len() >= 2,
        "publishing resumed: {:?}",
        versions.keys()
    );
    assert_eq!(
        (lost, duplicated, unexpected),
        (0, 0, 0),
        "lost, duplicated, unexpected"
    );
}

// ---------------------------------------------------------------------------------------
// Scenario: slow consumer (slow: 10 minutes of events).
// ---------------------------------------------------------------------------------------

/// A buffer of 1,000 rows, so that ten minutes of events overflow it many times.
const SLOW_CONSUMER: &str = "[runtime]\ntorch_threads = 1\nshutdown_timeout = \"180s\"\n\
                             [buffer]\nmax_rows = 1000\nsnapshot_every = \"5s\"\n\
                             [train]\nmin_pairs = 8\nbatch_size = 8\nmicro_batch_size = 8\n\
                             [checkpoint]\npublish_every = \"60s\"\nmax_kl = 1e9\n\
                             max_accuracy_drop = 1.0\n";

/// How long the events of the slow-consumer scenario take to arrive; 600 s unless
/// `REBELD_SLOW_CONSUMER_SECONDS` says otherwise.
fn slow_consumer_seconds() -> u64 {
    std::env::var("REBELD_SLOW_CONSUMER_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600)
}

/// What the slow-consumer scenario saw while events arrived.
#[derive(Debug, Default)]
struct Overflow {
    samples: u64,
    most_rows: f64,
    most_lag: f64,
    unhealthy: u64,
    rss_when_full: Option<u64>,
    buffer_bytes_when_full: f64,
    most_buffer_bytes: f64,
}

impl Overflow {
    fn sample(&mut self, daemon: &Daemon, port: u16) {
        self.samples += 1;
        let rows = daemon.metric("rebeld_buffer_rows").unwrap_or(0.0);
        self.most_rows = self.most_rows.max(rows);
        self.most_lag = self
            .most_lag
            .max(labelled_sum(port, "rebeld_ingest_consumer_lag_messages"));
        if http_get(daemon.api_port, "/healthz")
            .map(|(status, _)| status)
            .ok()
            != Some(200)
        {
            self.unhealthy += 1;
        }
        let bytes = daemon.metric("rebeld_buffer_bytes").unwrap_or(0.0);
        self.most_buffer_bytes = self.most_buffer_bytes.max(bytes);
        if rows >= 1000.0 && self.rss_when_full.is_none() {
            self.rss_when_full = resident_bytes(port);
            self.buffer_bytes_when_full = bytes;
        }
    }
}

#[test]
#[ignore = "slow: events arrive for 10 minutes"]
fn scenario_slow_consumer() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = DaemonConfig::new(&data, &broker.bootstrap, SLOW_CONSUMER);
    // Every step waits a second: eight pairs a second at most, below the event rate.
    let slow = [("REBELD_FAILPOINTS", "train.slow_step@1-1000000000")];
    let daemon = Daemon::start_with_env(&config, &slow);
    let rss = RssWatch::start(config.metrics_port);
    let port = config.metrics_port;

    let files: Vec<PathBuf> = [
        "harmless-base-test.jsonl.gz",
        "helpful-base-test.jsonl.gz",
        "helpful-rejection-sampled-test.jsonl.gz",
        "helpful-online-test.jsonl.gz",
    ]
    .iter()
    .map(|name| hh_dir().join(name))
    .collect();
    let sent: Vec<String> = files.iter().flat_map(|f| expected_ids(f)).collect();
    let unique: BTreeSet<String> = sent.iter().cloned().collect();
    let total = sent.len();
    let rate = u32::try_from(total as u64 / slow_consumer_seconds() + 1).expect("rate");
    let replay = {
        let bootstrap = broker.bootstrap.clone();
        std::thread::spawn(move || {
            let sent: Vec<u64> = files
                .iter()
                .map(|f| replay_file(&bootstrap, f, rate))
                .collect();
            sent.iter().sum::<u64>()
        })
    };

    let mut seen = Overflow::default();
    while !replay.is_finished() {
        seen.sample(&daemon, port);
        std::thread::sleep(Duration::from_secs(2));
    }
    let produced = replay.join().expect("replay thread");
    let evictions = || labelled_sum(port, "rebeld_buffer_evictions_total");
    let held = || daemon.metric("rebeld_buffer_rows").unwrap_or(0.0);
    wait_for(
        "every event held or evicted",
        Duration::from_secs(300),
        || {
            seen.sample(&daemon, port);
            held() + evictions() >= unique.len() as f64
        },
    );
    let (rows, evicted) = (held(), evictions());
    let never_trained = daemon
        .metric("rebeld_buffer_evicted_never_trained_total")
        .unwrap_or(0.0);
    let steps = daemon.metric("rebeld_train_steps_total").unwrap_or(0.0);
    let status = daemon.terminate(Duration::from_secs(200));
    assert!(status.success(), "{status:?}");

    let (held_ids, _) = support::snapshot_contents(&data);
    let held_unique: BTreeSet<&String> = held_ids.iter().collect();
    let accounted = rows + evicted;
    let lost = (unique.len() as f64 - accounted).max(0.0) as u64;
    // Growth of resident memory beyond what the buffer's own rows grew by (later files hold
    // longer conversations, so a full buffer's bytes still rise).
    let rows_growth = (seen.most_buffer_bytes - seen.buffer_bytes_when_full).max(0.0) as u64;
    let growth_mb = seen.rss_when_full.map(|full| {
        let peak = rss.peak.load(Ordering::Relaxed);
        peak.saturating_sub(full).saturating_sub(rows_growth) / (1 << 20)
    });
    let figures = Figures {
        produced: Some(produced),
        in_buffer: Some(rows as u64),
        lost: Some(lost),
        duplicated: Some((held_ids.len() - held_unique.len()) as u64),
        peak_rss_mb: rss.peak_mb(),
        ..Figures::default()
    };
    let pass = seen.most_rows <= 1000.0
        && seen.unhealthy == 0
        && lost == 0
        && accounted == unique.len() as f64
        && never_trained > 0.0
        && steps > 0.0
        && growth_mb.is_some_and(|mb| mb < 200);
    figures.report("slow_consumer", pass);
    eprintln!(
        "slow_consumer: {produced} events at {rate}/s, {} unique; {steps} steps; {evicted} \
         evicted ({never_trained} never trained); most rows {}; most lag {}; RSS grew \
         {growth_mb:?} MB beyond the rows' own growth after the buffer filled; {:?}",
        unique.len(),
        seen.most_rows,
        seen.most_lag,
        seen
    );
    assert!(
        seen.most_rows <= 1000.0,
        "the buffer held {} rows",
        seen.most_rows
    );
    assert_eq!(seen.unhealthy, 0, "/healthz failed while events arrived");
    assert_eq!(
        accounted,
        unique.len() as f64,
        "held plus evicted against unique events"
    );
    assert!(
        never_trained > 0.0,
        "the trainer kept up: the scenario did not overflow"
    );
    assert!(steps > 0.0, "the trainer never stepped");
    assert!(
        growth_mb.is_some_and(|mb| mb < 200),
        "resident memory grew {growth_mb:?} MB beyond the rows' own bytes after the buffer filled"
    );
}

// ---------------------------------------------------------------------------------------
// Scenario 5: broker outage (slow: the broker stays down for 40 s).
// ---------------------------------------------------------------------------------------

/// A tansu broker with durable SQLite storage in `dir`, so that topics, messages and the
/// group's committed offsets survive a stop and a start on the same port.
struct DurableTansu {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
}

impl DurableTansu {
    fn start(dir: &Path) -> Self {
        let mut broker = Self {
            child: None,
            dir: dir.to_owned(),
            port: support::free_port(),
        };
        broker.resume();
        support::create_topics(&broker.bootstrap(), 3);
        broker
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker process (again) on the same port and storage.
    fn resume(&mut self) {
        let child = support::spawn_tansu(self.port, "sqlite://tansu.db", Some(&self.dir));
        self.child = Some(child);
    }

    /// Kills the broker process, abruptly.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for DurableTansu {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
#[ignore = "slow: the broker is down for 40 s"]
fn scenario_broker_outage() {
    let _serial = support::serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let broker_dir = dir.path().join("broker");
    std::fs::create_dir_all(&broker_dir).expect("broker folder");
    let mut broker = DurableTansu::start(&broker_dir);
    let bootstrap = broker.bootstrap();
    let data = dir.path().join("data");
    let config = DaemonConfig::new(&data, &bootstrap, "");
    let daemon = Daemon::start(&config);
    let rss = RssWatch::start(config.metrics_port);

    let file = support::hh_file();
    let expected: BTreeSet<String> = expected_ids(&file).into_iter().collect();
    // The producer queues what it cannot deliver while the broker is down (for up to its
    // 60 s message timeout), so the replay spans the outage.
    let replay = {
        let (bootstrap, file) = (bootstrap.clone(), file.clone());
        std::thread::spawn(move || replay_file(&bootstrap, &file, 50))
    };
    wait_for("events arriving", Duration::from_secs(120), || {
        daemon
            .metric("rebeld_buffer_rows")
            .is_some_and(|rows| rows >= 200.0)
    });
    broker.stop();
    let down_until = Instant::now() + Duration::from_secs(40);
    let mut answered = 0u32;
    while Instant::now() < down_until {
        let health = http_get(daemon.api_port, "/healthz").map(|(status, _)| status);
        assert_eq!(
            health.ok(),
            Some(200),
            "the daemon answers while the broker is down"
        );
        answered += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    let rows_during = daemon.metric("rebeld_buffer_rows");
    broker.resume();
    let produced = replay.join().expect("replay thread");

    wait_for(
        "every event in the buffer",
        Duration::from_secs(300),
        || daemon.metric("rebeld_buffer_rows") == Some(expected.len() as f64),
    );
    let status = daemon.terminate(Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
    let (figures, lost, duplicated, unexpected) = exactly_once(&data, &expected, produced, &rss);
    let pass = lost == 0 && duplicated == 0 && unexpected == 0;
    figures.report("broker_outage", pass);
    eprintln!(
        "broker_outage: /healthz answered {answered} times during the outage; \
         {rows_during:?} rows when the broker came back"
    );
    assert_eq!(
        produced,
        expected.len() as u64,
        "the replay delivered everything"
    );
    assert_eq!(lost, 0, "events lost");
    assert_eq!(duplicated, 0, "events held twice");
    assert_eq!(unexpected, 0, "ids that were never sent");
}
