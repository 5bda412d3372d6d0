//! Shared helpers of the integration tests: a real tansu broker, the `rebeld` binary as a
//! daemon, and plain HTTP reads of its endpoints.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BINARY: &str = env!("CARGO_BIN_EXE_rebeld");
pub const TINY_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");
pub const TOPIC: &str = "rebeld.preferences";
pub const DEAD_LETTER_TOPIC: &str = "rebeld.preferences.dlq";

/// The HH-RLHF file the tests replay (never copied into the repository).
pub fn hh_file() -> PathBuf {
    let dir = std::env::var_os("REBELD_HH_RLHF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/hh-rlhf"));
    dir.join("harmless-base-test.jsonl.gz")
}

/// Tests that start a broker and a daemon run one at a time: on two cores, parallel runs
/// starve each other's group heartbeats.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[path = "../ports/mod.rs"]
mod ports;
pub use ports::free_port;

/// Waits for `check` to hold, polling; panics with `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, check: impl FnMut() -> bool) {
    if !poll_until(limit, check) {
        panic!("timed out after {limit:?} waiting for {what}");
    }
}

/// Polls `check` every 100 ms for up to `limit`; whether it came to hold.
fn poll_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A tansu broker on loopback with in-memory storage, stopped on drop.
pub struct Tansu {
    child: Child,
    pub bootstrap: String,
}

impl Tansu {
    /// Starts the broker and creates rebeld's topics with `partitions` each.
    pub fn start(partitions: u32) -> Self {
        let port = free_port();
        let child = spawn_tansu(port, "memory://tansu/", None);
        let bootstrap = format!("127.0.0.1:{port}");
        create_topics(&bootstrap, partitions);
        Self { child, bootstrap }
    }
}

/// A tansu broker on loopback `port` with `storage` (run in `dir` when given, where a
/// relative storage path lives), once it listens.
pub fn spawn_tansu(port: u16, storage: &str, dir: Option<&Path>) -> Child {
    let url = format!("tcp://127.0.0.1:{port}");
    let mut command = Command::new("tansu");
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let child = command
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", storage])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu (installed by scripts/setup)");
    wait_for("tansu to listen", Duration::from_secs(30), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    child
}

/// Creates rebeld's topics (events, dead letters, notices) with `partitions` each.
pub fn create_topics(bootstrap: &str, partitions: u32) {
    for topic in [TOPIC, DEAD_LETTER_TOPIC, "rebeld.checkpoints"] {
        let status = Command::new("tansu")
            .args(["topic", "create", topic, "--partitions"])
            .arg(partitions.to_string())
            .args(["--broker", &format!("tcp://{bootstrap}")])
            .stdout(Stdio::null())
            .status()
            .expect("tansu topic create");
        assert!(status.success(), "creating topic {topic}");
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Configuration for a daemon on `bootstrap`, with free ports and the tiny model.
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    pub api_port: u16,
    pub metrics_port: u16,
    pub body: String,
}

impl DaemonConfig {
    /// Defaults for tests (fast snapshots, a short group session, the tiny model, free ports),
    /// with the TOML in `extra` merged over them key by key.
    pub fn new(data_dir: &Path, bootstrap: &str, extra: &str) -> Self {
        let api_port = free_port();
        let metrics_port = free_port();
        let base = format!(
            "[runtime]\ndevice = \"cpu\"\ndata_dir = {data_dir:?}\nshutdown_timeout = \"20s\"\n\
             [kafka]\nbrokers = {bootstrap:?}\n\
             [kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\
             \"heartbeat.interval.ms\" = \"500\"\n\
             [buffer]\nsnapshot_every = \"500ms\"\n\
             [model]\npath = {TINY_MODEL:?}\n\
             [server]\nlisten = \"127.0.0.1:{api_port}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
        );
        let mut table: toml::Table = base.parse().expect("base config");
        merge(&mut table, extra.parse().expect("extra config"));

        Self {
            data_dir: data_dir.to_owned(),
            api_port,
            metrics_port,
            body: table.to_string(),
        }
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(more)) => merge(existing, more),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// A running `rebeld run`.
pub struct Daemon {
    child: Child,
    pub metrics_port: u16,
    pub api_port: u16,
    lines: mpsc::Receiver<String>,
    history: std::cell::RefCell<Vec<String>>,
}

impl Daemon {
    /// Writes the config beside the data folder and starts the daemon; returns once it logged
    /// its start-up line.
    pub fn start(config: &DaemonConfig) -> Self {
        Self::start_with_env(config, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_with_env(config: &DaemonConfig, env: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(&config.data_dir).expect("data dir");
        let path = config.data_dir.join("rebeld.toml");
        std::fs::write(&path, &config.body).expect("write config");

        let mut child = Command::new(BINARY)
            .args(["run", "--config"])
            .arg(&path)
            .env_remove("LD_LIBRARY_PATH")
            .env("REBELD_LOG", "warn,rebeld=info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rebeld run");
        let lines = forward_lines(child.stderr.take().expect("stderr"));
        let daemon = Self {
            child,
            metrics_port: config.metrics_port,
            api_port: config.api_port,
            lines,
            history: Default::default(),
        };
        daemon.wait_for_line("rebeld started", Duration::from_secs(60));
        daemon
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_for_line(&self, needle: &str, limit: Duration) -> String {
        let until = Instant::now() + limit;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.history.borrow_mut().push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("no log line containing {needle:?} within {limit:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "rebeld exited before logging {needle:?}; its last lines:\n{}",
                    self.last_lines(30)
                ),
            }
        }
    }

    /// How many log lines since start contain `needle`, reading every line logged so far.
    pub fn count_lines(&self, needle: &str) -> usize {
        self.read_pending_lines();
        let history = self.history.borrow();
        history.iter().filter(|line| line.contains(needle)).count()
    }

    /// Moves every line logged so far into the history.
    fn read_pending_lines(&self) {
        self.history.borrow_mut().extend(self.lines.try_iter());
    }

    /// The last `count` log lines read so far, one per line.
    fn last_lines(&self, count: usize) -> String {
        let history = self.history.borrow();
        let skip = history.len().saturating_sub(count);
        history[skip..].join("\n")
    }

    /// The first log line since start containing `needle`, waiting for it if need be.
    pub fn find_line(&self, needle: &str, limit: Duration) -> String {
        let seen = self
            .history
            .borrow()
            .iter()
            .find(|line| line.contains(needle))
            .cloned();
        seen.unwrap_or_else(|| self.wait_for_line(needle, limit))
    }

    /// The value of an unlabelled metric, if exposed.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = http_get(self.metrics_port, "/metrics").ok()?.1;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// Waits for the unlabelled metric `name` to read `value`; on timeout, panics with its
    /// last reading, the per-partition lag and the daemon's last log lines.
    pub fn wait_for_metric(&self, name: &str, value: f64, limit: Duration) {
        let mut last = None;
        if poll_until(limit, || {
            last = self.metric(name);
            last == Some(value)
        }) {
            return;
        }
        let lag: Vec<String> = http_get(self.metrics_port, "/metrics")
            .map(|(_, text)| text)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.starts_with("rebeld_ingest_consumer_lag"))
            .map(str::to_owned)
            .collect();
        self.read_pending_lines();
        panic!(
            "{name} read {last:?}, not {value}, after {limit:?}\n{}\nlast log lines:\n{}",
            lag.join("\n"),
            self.last_lines(30)
        );
    }

    /// Waits up to `limit` for the process to exit by itself.
    pub fn wait_exit(mut self, limit: Duration) -> ExitStatus {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("rebeld did not exit within {limit:?}");
    }

    /// A JSON document from the checkpoint API.
    pub fn api_json(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = http_get(self.api_port, path).expect("API request");
        let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    /// SIGKILL, no cleanup.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `limit` for the exit.
    pub fn terminate(mut self, limit: Duration) -> ExitStatus {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("rebeld did not stop within {limit:?} of SIGTERM");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn forward_lines(stderr: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if std::env::var_os("REBELD_TEST_ECHO").is_some() {
                eprintln!("{line}");
            }
            let _ = tx.send(line);
        }
    });
    rx
}

/// A consumer in group `group` assigned every partition of `topic` (three, as `Tansu::start`
/// makes them) from the beginning.
pub fn read_from_start(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> rdkafka::consumer::BaseConsumer {
    use rdkafka::consumer::Consumer;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut list = TopicPartitionList::new();
    for partition in 0..3 {
        list.add_partition_offset(topic, partition, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&list).expect("assign");
    // The list must go before the consumer does (dropping them the other way round hangs).
    drop(list);
    consumer
}

/// A plain HTTP/1.0 GET on loopback with the body as bytes: (status, body).
pub fn http_get_bytes(port: u16, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;

    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |at| at + 4);
    let head = String::from_utf8_lossy(&response[..end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok((status, response[end..].to_vec()))
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;

    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// `rebeld replay` of the HH-RLHF file; returns its standard output.
pub fn replay_hh(bootstrap: &str, extra: &[&str]) -> String {
    let output = Command::new(BINARY)
        .arg("replay")
        .arg(hh_file())
        .args(["--format", "hh-rlhf", "--quiet", "--brokers", bootstrap])
        .args(extra)
        .output()
        .expect("run rebeld replay");
    assert!(output.status.success(), "replay failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The ids the daemon must end up with for the HH file, computed without the daemon.
pub fn hh_expected_ids() -> BTreeSet<String> {
    expected_ids(&hh_file()).into_iter().collect()
}

/// The ids of an HH-RLHF file's events, computed without the daemon: each line converted and
/// parsed by the library, in file order (a repeated event repeats its id).
pub fn expected_ids(file: &Path) -> Vec<String> {
    let limits = rebeld::event::EventLimits::default();
    rebeld::replay::open_lines(file)
        .expect("HH file")
        .map_while(Result::ok)
        .filter_map(|line| rebeld::event::hh_rlhf::hh_to_event(&line).ok())
        .map(|event| {
            let bytes = event.to_string().into_bytes();
            rebeld::event::parse_event(Some(&bytes), &limits)
                .expect("valid event")
                .id
        })
        .collect()
}

/// The newest complete resume generation of a data folder, found without touching it (the
/// daemon may be running).
pub fn resume_generation(data_dir: &Path) -> rebeld::resume::Generation {
    let root = data_dir.join("resume");
    let newest = std::fs::read_dir(&root)
        .expect("resume folder")
        .filter_map(|entry| {
            let dir = entry.ok()?.path();
            let number = dir.file_name()?.to_str()?.strip_prefix('g')?.parse().ok()?;
            dir.join(rebeld::resume::MARKER_FILE)
                .is_file()
                .then_some(rebeld::resume::Generation { number, dir })
        })
        .max_by_key(|generation| generation.number);
    newest.expect("a complete resume generation")
}

/// The ids held by the daemon's last resume state, in buffer order, and its lifetime counters.
pub fn snapshot_contents(data_dir: &Path) -> (Vec<String>, rebeld::buffer::BufferStats) {
    let path = resume_generation(data_dir).file(rebeld::resume::BUFFER_FILE);
    let (buffer, _) = rebeld::buffer::read_snapshot(&path).expect("snapshot");
    let ids = buffer.ids().map(str::to_owned).collect();
    (ids, buffer.stats())
}
