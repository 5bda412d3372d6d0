//! The checkpoint API and `rebeld pull` against the real router on loopback, over a real
//! store on disk.

mod serve_support;

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use serve_support::*;

fn pulled_version(dir: &Path) -> Option<u64> {
    let bytes = std::fs::read(dir.join("manifest.json")).ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["version"].as_u64()
}

fn assert_same_as_fixture(pulled: &Path) {
    for name in MODEL_FILES {
        let expected = std::fs::read(Path::new(TINY_MODEL).join(name)).expect("fixture");
        let actual = std::fs::read(pulled.join(name)).expect("pulled file");
        assert!(expected == actual, "{name} differs from the fixture");
    }
}

#[test]
fn pull_fetches_the_latest_version_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::with_tiny_model(&dir.path().join("versions"));
    let manifest = server.store.manifest(1).expect("manifest");

    let to = dir.path().join("model");
    std::fs::create_dir(dir.path().join("model.venv")).expect("a neighbour");
    std::fs::create_dir(dir.path().join("model.v00000009.partial")).expect("stale staging");
    let (code, stderr) = pull(&server.url(), &to, None);
    assert_eq!(code, 0, "{stderr}");
    assert_same_as_fixture(&to);
    assert_eq!(pulled_version(&to), Some(1));
    assert!(
        dir.path().join("model.venv").is_dir(),
        "only its own folders are removed"
    );
    assert!(!dir.path().join("model.v00000009.partial").exists());
    assert_eq!(
        std::fs::read_link(&to).expect("a symlink"),
        Path::new("model.v00000001")
    );
    let total: u64 = manifest.files.values().map(|entry| entry.size).sum();
    assert_eq!(server.metrics.serve.bytes.get(), total);

    // Already current: nothing is downloaded again.
    let (code, stderr) = pull(&server.url(), &to, None);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(server.metrics.serve.bytes.get(), total);
}

#[test]
fn pull_resumes_a_partial_file_left_in_staging_and_refetches_a_corrupt_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::with_tiny_model(&dir.path().join("versions"));
    let manifest = server.store.manifest(1).expect("manifest");
    let weights = std::fs::read(Path::new(TINY_MODEL).join("model.safetensors")).expect("read");
    let half = weights.len() / 2;
    let total: u64 = manifest.files.values().map(|entry| entry.size).sum();

    let staging = dir.path().join("model.v00000001.partial");
    std::fs::create_dir(&staging).expect("mkdir");
    std::fs::write(staging.join("model.safetensors"), &weights[..half]).expect("write");
    let to = dir.path().join("model");
    let (code, stderr) = pull(&server.url(), &to, None);
    assert_eq!(code, 0, "{stderr}");
    assert_same_as_fixture(&to);
    assert!(stderr.contains("resuming a partial download"), "{stderr}");
    assert_eq!(server.metrics.serve.bytes.get(), total - half as u64);
    assert!(!staging.exists());

    // A wrong first half: the resumed file fails verification and is fetched again whole.
    let other = dir.path().join("other");
    let staging = dir.path().join("other.v00000001.partial");
    std::fs::create_dir(&staging).expect("mkdir");
    std::fs::write(staging.join("model.safetensors"), vec![0_u8; half]).expect("write");
    let before = server.metrics.serve.bytes.get();
    let (code, stderr) = pull(&server.url(), &other, None);
    assert_eq!(code, 0, "{stderr}");
    assert_same_as_fixture(&other);
    let weights_len = weights.len() as u64;
    assert_eq!(
        server.metrics.serve.bytes.get() - before,
        total - half as u64 + weights_len
    );
}

#[test]
fn pull_resumes_after_the_connection_drops_midway() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::with_tiny_model(&dir.path().join("versions"));
    let cut_after = 200_000;
    let proxy = cutting_proxy(server.port, "model.safetensors", cut_after);

    let to = dir.path().join("model");
    let (code, stderr) = pull(&format!("http://127.0.0.1:{proxy}"), &to, None);
    assert_eq!(code, 0, "{stderr}");
    assert_same_as_fixture(&to);
    assert!(stderr.contains("broke off"), "{stderr}");
    assert!(stderr.contains("resuming a partial download"), "{stderr}");
}

#[test]
fn pull_exit_codes_separate_usage_from_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("versions"), 3, server_config(&["r"], &[]));
    let to = dir.path().join("model");

    let (code, stderr) = pull("https://127.0.0.1:1", &to, None);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("TLS is not supported"), "{stderr}");
    std::fs::create_dir(dir.path().join("plain")).expect("mkdir");
    let (code, stderr) = pull(&server.url(), &dir.path().join("plain"), Some("r"));
    assert_eq!(code, 2, "{stderr}");

    let (code, stderr) = pull(&server.url(), &to, Some("r"));
    assert_eq!(code, 1, "no version yet: {stderr}");
    publish(&server.store, &[("a.bin", b"a")], true);
    server.store.promote(1).expect("promote");
    let (code, stderr) = pull(&server.url(), &to, Some("wrong"));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    let (code, stderr) = pull(&server.url(), &to, Some("r"));
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn pull_follow_tracks_promotions_and_rollbacks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("versions"), 5, server_config(&[], &[]));
    for i in 1..=2_u8 {
        publish(&server.store, &[("weights.bin", &[i; 1000])], true);
    }
    server.store.promote(1).expect("promote");
    let to = dir.path().join("model");
    let mut child = std::process::Command::new(BINARY)
        .args([
            "pull",
            "--follow",
            "--wait",
            "1s",
            "--server",
            &server.url(),
            "--to",
        ])
        .arg(&to)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn pull --follow");

    let at = |version| {
        let to = to.clone();
        move || pulled_version(&to) == Some(version)
    };
    wait_for("version 1", Duration::from_secs(60), at(1));
    server.store.promote(2).expect("promote");
    wait_for("version 2", Duration::from_secs(60), at(2));
    server.store.promote(1).expect("roll back");
    wait_for("the rollback to 1", Duration::from_secs(60), at(1));
    let weights = std::fs::read(dir.path().join("model/weights.bin")).expect("read");
    assert_eq!(weights, [1_u8; 1000]);

    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn pulled_tiny_model_loads_in_transformers_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::with_tiny_model(&dir.path().join("versions"));
    let to = dir.path().join("model");
    let (code, stderr) = pull(&server.url(), &to, None);
    assert_eq!(code, 0, "{stderr}");

    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/check_pulled_model.py"
    );
    let output = std::process::Command::new(python)
        .arg(script)
        .arg(&to)
        .arg(TINY_MODEL)
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn downloads_in_progress_keep_their_version_through_commits_promotions_and_pruning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("versions"), 1, server_config(&[], &[]));
    let big = noise(7, 24 << 20);
    let manifest = publish(&server.store, &[("model.safetensors", &big)], true);
    server.store.promote(1).expect("promote");
    let expected = manifest.files["model.safetensors"].sha256.clone();
    let clients = 32;
    let started = Arc::new(Barrier::new(clients + 1));
    let release = Arc::new(Barrier::new(clients + 1));

    let downloads: Vec<_> = (0..clients)
        .map(|_| {
            let (started, release) = (started.clone(), release.clone());
            let port = server.port;
            std::thread::spawn(move || {
                let (reply, mut body) =
                    open(port, "GET", "/v1/versions/1/files/model.safetensors", &[]);
                assert_eq!(reply.status, 200);
                let mut first = vec![0_u8; 1 << 20];
                body.read_exact(&mut first).expect("first MiB");
                started.wait();
                release.wait();
                let mut rest = Vec::new();
                body.read_to_end(&mut rest).expect("rest");
                first.extend_from_slice(&rest);
                sha256_hex(&first)
            })
        })
        .collect();
    started.wait();
    for i in 2..=4_u8 {
        let version = publish(&server.store, &[("model.safetensors", &[i; 100])], true).version;
        server.store.promote(version).expect("promote");
    }
    server.store.prune().expect("prune");
    let listed = versions_listed(&server.store);
    assert_eq!(
        listed,
        [4, 1],
        "the newest, and the version being downloaded"
    );
    assert!(
        dir.path().join("versions/v00000001").is_dir(),
        "leased version kept"
    );
    assert_eq!(
        server.metrics.serve.downloads_in_flight.get(),
        clients as i64
    );
    release.wait();

    for download in downloads {
        assert_eq!(download.join().expect("client"), expected);
    }
    wait_for(
        "version 1 pruned once released",
        Duration::from_secs(30),
        || server.store.prune().expect("prune") == [1],
    );
    assert!(!dir.path().join("versions/v00000001").exists());
}

#[test]
fn thirty_two_clients_verify_every_download_while_versions_churn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("versions"), 2, server_config(&[], &[]));
    publish(&server.store, &[("a.bin", &noise(0, 1 << 20))], true);
    server.store.promote(1).expect("promote");
    let stop = Arc::new(AtomicBool::new(false));
    let store = server.store.clone();
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seed = 1;
            while !stop.load(Ordering::SeqCst) {
                let files = [
                    ("a.bin", noise(seed, 1 << 20)),
                    ("b.bin", noise(seed + 1, 300_000)),
                ];
                let files: Vec<(&str, &[u8])> =
                    files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
                let version = publish(&store, &files, true).version;
                store.promote(version).expect("promote");
                seed += 2;
            }
            seed / 2
        })
    };
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let port = server.port;
            std::thread::spawn(move || verified_pulls(port, 3))
        })
        .collect();
    for client in clients {
        client.join().expect("client");
    }
    stop.store(true, Ordering::SeqCst);
    let versions = churn.join().expect("churn");
    assert!(versions > 0);
    assert!(server.store.list().len() <= 2, "retention ran");
}

/// Fetches latest manifests and their files until `want` versions verified whole; a 404 is
/// accepted only for a version retention has removed since its manifest was read.
fn verified_pulls(port: u16, want: usize) {
    let mut verified = 0;
    for _ in 0..200 {
        let manifest = get(port, "/v1/versions/latest", None).json();
        let version = manifest["version"].as_u64().expect("version");
        let mut complete = true;
        for (name, entry) in manifest["files"].as_object().expect("files") {
            let reply = get(port, &format!("/v1/versions/{version}/files/{name}"), None);
            if reply.status == 404 {
                let listed = get(port, &format!("/v1/versions/{version}"), None).status;
                assert_eq!(listed, 404, "404 for a file of a listed version");
                complete = false;
                break;
            }
            assert_eq!(reply.status, 200);
            assert_eq!(
                reply.body.len() as u64,
                entry["size"].as_u64().expect("size")
            );
            assert_eq!(
                sha256_hex(&reply.body),
                entry["sha256"].as_str().expect("sha")
            );
        }
        verified += usize::from(complete);
        if verified == want {
            return;
        }
    }
    panic!("only {verified} versions verified");
}

#[test]
fn the_download_cap_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = server_config(&[], &[]);
    config.max_concurrent_downloads = 1;
    let server = TestServer::start(&dir.path().join("versions"), 2, config);
    publish(&server.store, &[("big.bin", &noise(3, 24 << 20))], true);

    let (first, body) = open(server.port, "GET", "/v1/versions/1/files/big.bin", &[]);
    assert_eq!(first.status, 200);
    let second = get(server.port, "/v1/versions/1/files/big.bin", None);
    assert_eq!(second.status, 503);
    assert_eq!(second.header("retry-after"), Some("1"));
    assert!(second.error().contains("max_concurrent_downloads"));
    assert_eq!(server.metrics.serve.refused.get(), 1);
    drop(body);
    wait_for("the permit to return", Duration::from_secs(30), || {
        get(server.port, "/v1/versions/1/files/big.bin", None).status == 200
    });
}

#[test]
fn ranges_etags_and_cache_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("versions"), 2, server_config(&[], &[]));
    let content = noise(5, 1000);
    let manifest = publish(&server.store, &[("w.bin", &content)], true);
    let etag = format!("\"{}\"", manifest.files["w.bin"].sha256);
    let path = "/v1/versions/1/files/w.bin";

    let full = get(server.port, path, None);
    assert_eq!(full.status, 200);
    assert_eq!(full.body, content);
    assert_eq!(full.header("etag"), Some(etag.as_str()));
    assert_eq!(full.header("content-length"), Some("1000"));
    assert_eq!(
        full.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );

    let part = send(server.port, "GET", path, &[("Range", "bytes=100-199")]);
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-range"), Some("bytes 100-199/1000"));
    assert_eq!(part.body, content[100..200]);
    let tail = send(server.port, "GET", path, &[("Range", "bytes=-10")]);
    assert_eq!(tail.body, content[990..]);
    let beyond = send(server.port, "GET", path, &[("Range", "bytes=1000-")]);
    assert_eq!(beyond.status, 416);
    assert_eq!(beyond.header("content-range"), Some("bytes */1000"));
    let cached = send(server.port, "GET", path, &[("If-None-Match", &etag)]);
    assert_eq!(cached.status, 304);
    assert!(cached.body.is_empty());
    let stale = send(
        server.port,
        "GET",
        path,
        &[("Range", "bytes=0-9"), ("If-Range", "\"other\"")],
    );
    assert_eq!(
        stale.status, 200,
        "If-Range with another tag gets the whole file"
    );
}

#[test]
fn tokens_gate_reads_and_admin_routes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = server_config(&["reader"], &["admin"]);
    let server = TestServer::start(&dir.path().join("versions"), 2, config);
    publish(&server.store, &[("w.bin", b"w")], true);
    let port = server.port;

    assert_eq!(get(port, "/healthz", None).status, 200);
    assert_eq!(get(port, "/readyz", None).status, 503);
    for target in [
        "/v1/versions",
        "/v1/versions/1",
        "/v1/versions/1/files/w.bin",
    ] {
        let anonymous = get(port, target, None);
        assert_eq!(anonymous.status, 401, "{target}");
        assert!(anonymous
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")));
        assert_eq!(get(port, target, Some("guess")).status, 401, "{target}");
        assert_eq!(get(port, target, Some("reader")).status, 200, "{target}");
        assert_eq!(get(port, target, Some("admin")).status, 200, "{target}");
    }
    let post = |token: &str| {
        let auth = format!("Bearer {token}");
        send(
            port,
            "POST",
            "/v1/versions/1/promote",
            &[("Authorization", &auth)],
        )
    };
    assert_eq!(
        send(port, "POST", "/v1/versions/1/promote", &[]).status,
        401
    );
    assert_eq!(post("guess").status, 401);
    let forbidden = post("reader");
    assert_eq!(forbidden.status, 403);
    assert!(forbidden.error().contains("admin_tokens"));
    assert_eq!(server.store.latest(), None);
    let promoted = post("admin");
    assert_eq!(promoted.status, 200);
    assert_eq!(promoted.json()["status"], "latest");
    assert_eq!(server.store.latest(), Some(1));

    let auth = [("Authorization", "Bearer admin")];
    assert_eq!(
        send(port, "POST", "/v1/versions/1/pin", &auth).json()["pinned"],
        true
    );
    assert_eq!(
        send(port, "DELETE", "/v1/versions/1/pin", &auth).json()["pinned"],
        false
    );
    let reader = [("Authorization", "Bearer reader")];
    assert_eq!(
        send(port, "DELETE", "/v1/versions/1/pin", &reader).status,
        403
    );
}

#[test]
fn traversal_attempts_never_read_outside_a_committed_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("versions");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    std::fs::write(outside.join("secret.txt"), b"SECRET").expect("write");
    // A folder named like a version, with a manifest listing the secret, behind a symlink.
    let fake = serde_json::json!({
        "format": 1, "version": 9, "parent": null, "created_at": "2026-01-01T00:00:00Z",
        "files": {"secret.txt": {"sha256": sha256_hex(b"SECRET"), "size": 6}},
        "trainer_step": 0, "objective": "rebel", "radius": 0.1, "events_trained": 0,
        "pairs_trained": 0, "lineage": {"partitions": [], "event_time_ms": null},
        "gates": {"passed": true, "checks": []}
    });
    std::fs::write(outside.join("manifest.json"), fake.to_string()).expect("write");
    std::fs::write(outside.join(".complete"), b"").expect("write");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::os::unix::fs::symlink(&outside, root.join("v00000009")).expect("symlink");
    std::os::unix::fs::symlink(&outside, root.join("v0000001%2e")).expect("symlink");
    std::fs::create_dir(root.join("v0000000..")).expect("odd folder");
    let server = TestServer::start(&root, 2, server_config(&[], &[]));
    publish(&server.store, &[("w.bin", b"weights")], true);
    server.store.promote(1).expect("promote");
    std::fs::write(root.join("v00000001.txt"), b"SECRET").expect("stray file");

    let attempts = [
        "/v1/versions/1/files/../../outside/secret.txt",
        "/v1/versions/1/files/..%2f..%2foutside%2fsecret.txt",
        "/v1/versions/1/files/%2e%2e%2f%2e%2e%2foutside%2fsecret.txt",
        "/v1/versions/1/files/%2e%2e/%2e%2e/outside/secret.txt",
        "/v1/versions/1/files/..",
        "/v1/versions/1/files/%2e%2e",
        "/v1/versions/1/files/manifest.json",
        "/v1/versions/1/files/.complete",
        "/v1/versions/1/files/%2Fetc%2Fpasswd",
        "/v1/versions/1/files//etc/passwd",
        "/v1/versions/1/files/missing.bin",
        "/v1/versions/9/files/secret.txt",
        "/v1/versions/9",
        "/v1/versions/0000001%2e/files/secret.txt",
        "/v1/versions/1%2f..%2f9/files/secret.txt",
        "/v1/versions/..%2fv00000009/files/secret.txt",
        "/v1/versions/1.txt",
        "/v1/versions/-1/files/w.bin",
        "/../outside/secret.txt",
        "/v1/versions/1/files/w.bin/../../9/files/secret.txt",
    ];
    for target in attempts {
        let reply = get(server.port, target, None);
        assert!(
            matches!(reply.status, 400 | 404),
            "{target}: {}",
            reply.status
        );
        assert!(
            !String::from_utf8_lossy(&reply.body).contains("SECRET"),
            "{target}"
        );
    }
    let listed = versions_listed(&server.store);
    assert_eq!(listed, [1]);
    assert_eq!(
        get(server.port, "/v1/versions/1/files/w.bin", None).body,
        b"weights"
    );
    assert!(outside.join("secret.txt").exists());
}

#[test]
fn rejected_versions_rollbacks_and_long_polls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = server_config(&[], &["a"]);
    config.allow_anonymous = true;
    let server = TestServer::start(&dir.path().join("versions"), 5, config);
    let port = server.port;
    let none = get(port, "/v1/versions/latest", None);
    assert_eq!(none.status, 404);
    assert!(none.error().contains("no version"));
    publish(&server.store, &[("w.bin", b"1")], true);
    publish(&server.store, &[("w.bin", b"2")], true);
    publish(&server.store, &[("w.bin", b"3")], false);
    server.store.promote(1).expect("promote");

    let admin = [("Authorization", "Bearer a")];
    let refused = send(port, "POST", "/v1/versions/3/promote", &admin);
    assert_eq!(refused.status, 409);
    assert!(
        refused.error().contains("kl_to_latest"),
        "{}",
        refused.error()
    );
    assert_eq!(
        send(port, "POST", "/v1/versions/7/promote", &admin).status,
        404
    );
    let list = get(port, "/v1/versions", None).json();
    assert_eq!(list["latest"], 1);
    let rows = list["versions"].as_array().expect("rows");
    let statuses: Vec<&str> = rows
        .iter()
        .map(|r| r["status"].as_str().expect("s"))
        .collect();
    assert_eq!(statuses, ["rejected", "published", "latest"]);
    let reason = rows[0]["reasons"][0].as_str().expect("reason");
    assert!(
        reason.starts_with("kl_to_latest: 0.3 against threshold 0.05"),
        "{reason}"
    );

    // A long poll after 1 ends when 2 is promoted.
    let waiter =
        std::thread::spawn(move || get(port, "/v1/versions/latest?after=1&wait=30s", None));
    wait_for("the long poll to wait", Duration::from_secs(30), || {
        server.metrics.serve.long_polls.get() == 1
    });
    assert_eq!(
        send(port, "POST", "/v1/versions/2/promote", &admin).status,
        200
    );
    let answer = waiter.join().expect("waiter");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["version"], 2);

    // A rollback to 1 does not end a poll after 2; a poll after 0 sees 1 at once.
    assert_eq!(
        send(port, "POST", "/v1/versions/1/promote", &admin).status,
        200
    );
    assert_eq!(
        get(port, "/v1/versions/latest?after=2&wait=1s", None).status,
        204
    );
    assert_eq!(
        get(port, "/v1/versions/latest?after=0&wait=30s", None).json()["version"],
        1
    );
    assert_eq!(get(port, "/v1/versions/latest", None).json()["version"], 1);
    assert_eq!(
        get(port, "/v1/versions/latest?after=0&wait=soon", None).status,
        400
    );
}

#[test]
fn requests_are_counted_by_route_template() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("versions"), 2, server_config(&[], &[]));
    publish(&server.store, &[("w.bin", b"w")], true);
    get(server.port, "/v1/versions/1/files/w.bin", None);
    get(server.port, "/v1/versions/1/files/nope", None);
    get(server.port, "/nowhere/at/all", None);

    let count = |route: &str, status: &str| {
        server
            .metrics
            .http_requests
            .with_label_values(&["api", route, status])
            .get()
    };
    assert_eq!(count("/v1/versions/{version}/files/{name}", "200"), 1);
    assert_eq!(count("/v1/versions/{version}/files/{name}", "404"), 1);
    assert_eq!(count("unmatched", "404"), 1);
    for target in ["/nowhere/at/all", "/v1/versions/latest?after=soon"] {
        let reply = get(server.port, target, None);
        assert!(reply.status >= 400, "{target}");
        assert!(!reply.error().is_empty(), "{target}: JSON error body");
    }
    let wrong_method = send(server.port, "PUT", "/v1/versions", &[]);
    assert_eq!(wrong_method.status, 405);
    assert!(!wrong_method.error().is_empty());
    let text = String::from_utf8(server.metrics.render()).expect("utf-8");
    assert!(!text.contains("w.bin"), "raw paths never become labels");
}

#[test]
fn the_daemon_serves_its_data_folder_and_ends_long_polls_at_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("var");
    {
        let store = rebeld::checkpoint::CheckpointStore::open(&data_dir.join("versions"), 3)
            .expect("store");
        publish_tiny_model(&store);
        store.promote(1).expect("promote");
    }
    std::fs::create_dir(data_dir.join("versions/v00000002")).expect("a partial version");
    let (api, metrics) = (free_port(), free_port());
    let config = dir.path().join("rebeld.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\ndevice = \"cpu\"\ndata_dir = {data_dir:?}\nshutdown_timeout = \"20s\"\n\
             [model]\npath = {TINY_MODEL:?}\n\
             [server]\nlisten = \"127.0.0.1:{api}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n"
        ),
    )
    .expect("config");
    let mut daemon = Daemon::start(&config);

    assert!(
        !data_dir.join("versions/v00000002").exists(),
        "partial removed at start"
    );
    assert_eq!(get(api, "/readyz", None).json()["version_servable"], true);
    let to = dir.path().join("model");
    let (code, stderr) = pull(&format!("http://127.0.0.1:{api}"), &to, None);
    assert_eq!(code, 0, "{stderr}");
    assert_same_as_fixture(&to);

    let poll = std::thread::spawn(move || get(api, "/v1/versions/latest?after=1&wait=60s", None));
    wait_for("the long poll to wait", Duration::from_secs(30), || {
        let text = get(metrics, "/metrics", None).body;
        String::from_utf8_lossy(&text).contains("rebeld_serve_long_polls_waiting 1")
    });
    assert_eq!(daemon.terminate().code(), Some(0));
    assert_eq!(poll.join().expect("poll").status, 204);
}
