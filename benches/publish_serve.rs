//! Publication and serving of a SmolLM2-sized version, against the same bytes moved by
//! coreutils, in the same run: `cargo bench --bench publish_serve` (prints tables; never a
//! test).
//!
//! - Publication: `CheckpointStore::begin`, the weights saved in bf16 with the tokenizer
//!   files, `commit` (sha256 of every file, manifest, fsync, rename, marker), against
//!   `cp -r` of the committed folder plus `sha256sum` of the copy (and with `sync` of the copy
//!   in between, since the store flushes to disk and plain `cp` does not).
//! - Serving: one client downloading `model.safetensors` from the API router over loopback
//!   HTTP/1.1, against `cat FILE > /dev/null` and against the same bytes written raw into a
//!   loopback TCP socket from a memory map of the file (what the socket itself allows,
//!   without HTTP); then 32 clients at once. The file is in the
//!   page cache for every reader (it was just written and read).

#[path = "../tests/serve_support/mod.rs"]
mod serve_support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rebeld::checkpoint::{version_dir_name, CheckpointStore};
use rebeld::model::llama::Llama;
use rebeld::model::weights::SaveDtype;
use serve_support::{fields, open, server_config, TestServer};
use tch::nn::VarStore;
use tch::Device;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const MODEL: &str = "models/smollm2-135m-instruct";
const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];
const ROUNDS: usize = 3;
const CLIENTS: usize = 32;
const WEIGHTS: &str = "model.safetensors";

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn shell(script: &str) -> f64 {
    let started = Instant::now();
    let status = Command::new("sh")
        .args(["-c", script])
        .status()
        .expect("sh");
    assert!(status.success(), "{script}");
    started.elapsed().as_secs_f64()
}

/// Seconds to publish one version of `model` through `store`.
fn publish_once(store: &CheckpointStore, vs: &VarStore, model: &Llama) -> (u64, f64) {
    let started = Instant::now();
    let draft = store.begin().expect("begin");
    model
        .save_pretrained(vs, draft.dir(), SaveDtype::BF16)
        .expect("save");
    for name in TOKENIZER_FILES {
        std::fs::copy(
            Path::new(ROOT).join(MODEL).join(name),
            draft.dir().join(name),
        )
        .expect("copy");
    }
    let manifest = store.commit(draft, fields(true)).expect("commit");
    (manifest.version, started.elapsed().as_secs_f64())
}

fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum()
}

fn publication(server: &TestServer, scratch: &Path) -> PathBuf {
    let vs = VarStore::new(Device::Cpu);
    let model = Llama::from_pretrained(&vs, &Path::new(ROOT).join(MODEL)).expect("model");
    let (mut ours, mut plain, mut synced) = (Vec::new(), Vec::new(), Vec::new());
    let mut version = 0;
    for round in 0..ROUNDS {
        let (v, seconds) = publish_once(&server.store, &vs, &model);
        version = v;
        ours.push(seconds);
        let from = server.store.root().join(version_dir_name(v));
        let to = scratch.join(format!("cp-{round}"));
        let to = to.display();
        let from = from.display();
        plain.push(shell(&format!(
            "cp -r {from} {to} && sha256sum {to}/* > /dev/null"
        )));
        shell(&format!("rm -r {to}"));
        synced.push(shell(&format!(
            "cp -r {from} {to} && sync {to}/* && sha256sum {to}/* > /dev/null"
        )));
        shell(&format!("rm -r {to}"));
    }
    let dir = server.store.root().join(version_dir_name(version));
    let bytes = folder_bytes(&dir);
    let (ours, plain, synced) = (median(ours), median(plain), median(synced));
    println!("\npublication: {bytes} bytes per version (bf16 weights + tokenizer files)");
    println!("\n| path | median s | MB/s | rebeld's ratio |");
    println!("| --- | ---: | ---: | ---: |");
    let mb = bytes as f64 / 1e6;
    for (label, s) in [
        ("rebeld: save + CheckpointStore::commit", ours),
        ("cp -r + sha256sum", plain),
        ("cp -r + sync + sha256sum", synced),
    ] {
        println!("| {label} | {s:.3} | {:.0} | {:.2}x |", mb / s, ours / s);
    }
    server.store.promote(version).expect("promote");
    dir.join(WEIGHTS)
}

fn download(port: u16, target: &str) -> u64 {
    let (reply, body) = open(port, "GET", target, &[]);
    assert_eq!(reply.status, 200, "{target}");
    drain(body)
}

/// Reads to the end in 1 MiB reads, as every client of this bench does; returns the bytes.
fn drain(mut source: impl Read) -> u64 {
    let mut buf = vec![0_u8; 1 << 20];
    let mut total = 0_u64;
    loop {
        let n = source.read(&mut buf).expect("read body");
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

/// Sends the file raw to one loopback client, which reads it as `download` does.
fn raw_socket(file: &Path) -> u64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let (mut socket, _) = listener.accept().expect("accept");
            let source = std::fs::File::open(file).expect("open");
            // SAFETY: the bench's own file, which nothing changes while it is mapped.
            let map = unsafe { memmap2::Mmap::map(&source) }.expect("map");
            socket.write_all(&map).expect("send");
        });
        drain(TcpStream::connect(("127.0.0.1", port)).expect("connect"))
    })
}

fn serving(server: &TestServer, file: &Path) {
    let size = std::fs::metadata(file).expect("file").len();
    let version = server.store.latest().expect("latest");
    let target = format!("/v1/versions/{version}/files/{WEIGHTS}");
    let cat = format!("cat {} > /dev/null", file.display());
    shell(&cat);
    let (mut disk, mut raw, mut one, mut many) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        disk.push(shell(&cat));
        let started = Instant::now();
        assert_eq!(raw_socket(file), size);
        raw.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        assert_eq!(download(server.port, &target), size);
        one.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..CLIENTS)
                .map(|_| scope.spawn(|| download(server.port, &target)))
                .collect();
            for handle in handles {
                assert_eq!(handle.join().expect("client"), size);
            }
        });
        many.push(started.elapsed().as_secs_f64());
    }
    let (disk, raw, one, many) = (median(disk), median(raw), median(one), median(many));
    let rate = |bytes: f64, s: f64| bytes / s / 1e6;
    let disk_rate = rate(size as f64, disk);
    println!("\nserving: {WEIGHTS}, {size} bytes, page cache warm, loopback HTTP/1.1");
    println!("\n| reader | median s | MB/s (aggregate) | ratio to cat | ratio to raw socket |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let raw_rate = rate(size as f64, raw);
    let rows = [
        ("cat FILE > /dev/null", disk, size as f64),
        ("raw loopback socket, 1 client", raw, size as f64),
        ("1 API client", one, size as f64),
        (
            "32 API clients at once",
            many,
            (size * CLIENTS as u64) as f64,
        ),
    ];
    for (label, s, bytes) in rows {
        let r = rate(bytes, s);
        let (to_cat, to_raw) = (r / disk_rate, r / raw_rate);
        println!("| {label} | {s:.3} | {r:.0} | {to_cat:.2}x | {to_raw:.2}x |");
    }
}

fn main() {
    tch::set_num_threads(2);
    let scratch = Path::new(ROOT).join("target/bench-scratch/publish");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).expect("clear scratch");
    }
    std::fs::create_dir_all(&scratch).expect("scratch");
    let server = TestServer::start(&scratch.join("store"), 2, server_config(&[], &[]));
    let file = publication(&server, &scratch);
    serving(&server, &file);
    drop(server);
    std::fs::remove_dir_all(&scratch).expect("remove scratch");
}
