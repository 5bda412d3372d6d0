//! Helpers of the checkpoint API tests: the real API router served on loopback over a real
//! store, raw HTTP/1.1 requests, and a proxy that cuts one download short.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rebeld::api::{router, ApiParts};
use rebeld::checkpoint::{
    CheckpointStore, GateCheck, GateReport, Lineage, Manifest, ManifestFields,
};
use rebeld::config::{Secret, ServerConfig};
use rebeld::health::Readiness;
use rebeld::metrics::{BuildFacts, Metrics};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub const BINARY: &str = env!("CARGO_BIN_EXE_rebeld");
pub const TINY_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");
/// The files of the tiny model an inference server needs (the fixture's reference JSONs are
/// test data, not model files).
pub const MODEL_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// `[server]` for tests: loopback, generous limits, the given tokens.
pub fn server_config(read: &[&str], admin: &[&str]) -> ServerConfig {
    let secrets = |tokens: &[&str]| tokens.iter().map(|t| Secret::new(*t)).collect();
    ServerConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        allow_anonymous: false,
        read_tokens: secrets(read),
        admin_tokens: secrets(admin),
        request_timeout: Duration::from_secs(30),
        max_concurrent_downloads: 64,
        max_long_poll: Duration::from_secs(30),
        public_url: "http://127.0.0.1".into(),
    }
}

/// The API router over a store, served on a free loopback port from its own runtime.
pub struct TestServer {
    pub port: u16,
    pub store: CheckpointStore,
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl TestServer {
    pub fn start(root: &Path, keep_versions: usize, server: ServerConfig) -> Self {
        let store = CheckpointStore::open(root, keep_versions).expect("open store");
        let metrics = Metrics::new(&BuildFacts {
            version: "test".into(),
            libtorch: "test".into(),
            librdkafka: "test".into(),
            device: "cpu".into(),
        })
        .expect("metrics");
        let shutdown = CancellationToken::new();
        let app = router(ApiParts {
            readiness: Readiness::new(),
            metrics: metrics.clone(),
            store: Some(store.clone()),
            server,
            shutdown: shutdown.clone(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let token = shutdown.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                axum::serve(listener, app)
                    .with_graceful_shutdown(token.cancelled_owned())
                    .await
                    .expect("serve");
            });
        });
        Self {
            port,
            store,
            metrics,
            shutdown,
        }
    }

    /// Open reads, the tiny model committed as version 1 and promoted.
    pub fn with_tiny_model(root: &Path) -> Self {
        let server = Self::start(root, 3, server_config(&[], &[]));
        publish_tiny_model(&server.store);
        server.store.promote(1).expect("promote");
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // The serving thread ends once its connections close; a failed test is not held
        // up waiting for it.
        self.shutdown.cancel();
    }
}

/// Publisher fields with one gate check that passed or failed.
pub fn fields(passed: bool) -> ManifestFields {
    ManifestFields {
        parent: None,
        trainer_step: 1,
        objective: "rebel".into(),
        radius: 0.1,
        events_trained: 10,
        pairs_trained: 8,
        lineage: Lineage::default(),
        gates: GateReport {
            passed,
            checks: vec![GateCheck {
                name: "kl_to_latest".into(),
                passed,
                value: Some(if passed { 0.01 } else { 0.3 }),
                threshold: Some(0.05),
                detail: "mean per-token KL on held-out prompts".into(),
            }],
        },
    }
}

/// Commits a version holding `files`.
pub fn publish(store: &CheckpointStore, files: &[(&str, &[u8])], passed: bool) -> Manifest {
    let draft = store.begin().expect("begin");
    for (name, bytes) in files {
        std::fs::write(draft.dir().join(name), bytes).expect("write draft file");
    }
    store.commit(draft, fields(passed)).expect("commit")
}

/// Commits the tiny model's files as a version.
pub fn publish_tiny_model(store: &CheckpointStore) -> Manifest {
    let files: Vec<(&str, Vec<u8>)> = MODEL_FILES
        .iter()
        .map(|name| {
            (
                *name,
                std::fs::read(Path::new(TINY_MODEL).join(name)).expect("read"),
            )
        })
        .collect();
    let borrowed: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    publish(store, &borrowed, true)
}

/// The versions a store lists, newest first.
pub fn versions_listed(store: &CheckpointStore) -> Vec<u64> {
    store.list().iter().map(|info| info.version).collect()
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u8
        })
        .collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .expect("error text")
            .to_owned()
    }
}

/// Writes a request with `target` sent exactly as given (no normalisation).
fn write_request(stream: &mut TcpStream, method: &str, target: &str, headers: &[(&str, &str)]) {
    let mut request = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Connection: close\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("send request");
}

/// Reads a status line and headers.
fn read_head(reader: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header line");
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    (status, headers)
}

/// One request on a fresh connection; the whole answer.
pub fn send(port: u16, method: &str, target: &str, headers: &[(&str, &str)]) -> Reply {
    let (mut reply, mut reader) = open(port, method, target, headers);
    reader.read_to_end(&mut reply.body).expect("body");
    reply
}

/// A GET with an optional bearer token.
pub fn get(port: u16, target: &str, token: Option<&str>) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    send(port, "GET", target, &headers)
}

/// A request whose answer head is read; the body is left on the returned reader.
pub fn open(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> (Reply, BufReader<TcpStream>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    write_request(&mut stream, method, target, headers);
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let reply = Reply {
        status,
        headers,
        body: Vec::new(),
    };
    (reply, reader)
}

/// A loopback proxy to `upstream` that cuts the answer to the first request whose head
/// contains `needle` after `cut_after` bytes; every other exchange passes whole.
pub fn cutting_proxy(upstream: u16, needle: &'static str, cut_after: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let port = listener.local_addr().expect("addr").port();
    let armed = Arc::new(AtomicBool::new(true));
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let armed = armed.clone();
            std::thread::spawn(move || relay(client, upstream, needle, cut_after, &armed));
        }
    });
    port
}

fn relay(client: TcpStream, upstream: u16, needle: &str, cut_after: usize, armed: &AtomicBool) {
    let mut reader = BufReader::new(client.try_clone().expect("clone"));
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        if reader.read_line(&mut head).unwrap_or(0) == 0 {
            return;
        }
    }
    let cut = head.contains(needle) && armed.swap(false, Ordering::SeqCst);
    let mut server = TcpStream::connect(("127.0.0.1", upstream)).expect("upstream");
    server.write_all(head.as_bytes()).expect("forward head");
    let mut to_server = server.try_clone().expect("clone");
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut reader, &mut to_server);
        let _ = to_server.shutdown(Shutdown::Write);
    });
    let mut to_client = client;
    if cut {
        let _ = std::io::copy(&mut (&mut server).take(cut_after as u64), &mut to_client);
        let _ = to_client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
    } else {
        let _ = std::io::copy(&mut server, &mut to_client);
        let _ = to_client.shutdown(Shutdown::Write);
    }
}

/// Waits for `check`, polling; panics with `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + limit;
    while std::time::Instant::now() < until {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// `rebeld pull` once; returns (exit code, standard error).
pub fn pull(server: &str, to: &Path, token: Option<&str>) -> (i32, String) {
    let mut command = std::process::Command::new(BINARY);
    command
        .args(["pull", "--server", server, "--to"])
        .arg(to)
        .env_remove("REBELD_TOKEN")
        .env("REBELD_LOG", "rebeld=info");
    if let Some(token) = token {
        command.env("REBELD_TOKEN", token);
    }
    let output = command.output().expect("run rebeld pull");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[path = "../ports/mod.rs"]
mod ports;
pub use ports::free_port;

/// `rebeld run` on a config file, killed on drop.
pub struct Daemon {
    child: std::process::Child,
}

impl Daemon {
    /// Starts the daemon and waits for its start-up line.
    pub fn start(config: &Path) -> Self {
        let mut child = std::process::Command::new(BINARY)
            .args(["run", "--config"])
            .arg(config)
            .env("REBELD_LOG", "warn,rebeld=info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn rebeld run");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let daemon = Self { child };
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.contains("rebeld started") => return daemon,
                Ok(_) => {}
                Err(_) => panic!("rebeld run did not start within 60 s"),
            }
        }
    }

    /// SIGTERM, then the exit status (within 60 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < until {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("rebeld did not stop within 60 s of SIGTERM");
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
