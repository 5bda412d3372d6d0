//! The `rebeld` binary as users meet it: exit codes, messages, linking, signals.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_rebeld");
const TINY_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");

/// The binary with a clean environment: no LD_LIBRARY_PATH, no overrides from the caller.
fn rebeld() -> Command {
    let mut command = Command::new(BINARY);
    command.env_remove("LD_LIBRARY_PATH");
    for (name, _) in std::env::vars() {
        if name.starts_with("REBELD__") {
            command.env_remove(name);
        }
    }
    command
}

fn output(command: &mut Command) -> Output {
    command.output().expect("run rebeld")
}

fn write_config(dir: &Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("rebeld.toml");
    std::fs::write(&path, body).expect("write config");
    path
}

#[test]
fn version_reports_libtorch_2_11_without_library_path() {
    let out = output(rebeld().arg("version"));
    let stdout = String::from_utf8_lossy(&out.stdout);

    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("libtorch 2.11.0"), "{stdout}");
    assert!(stdout.contains("librdkafka 2."), "{stdout}");
    assert!(stdout.contains("cuda available: "), "{stdout}");
}

#[test]
fn binary_resolves_libtorch_cuda_through_its_runpath() {
    let ldd = output(
        Command::new("ldd")
            .arg(BINARY)
            .env_remove("LD_LIBRARY_PATH"),
    );
    let listing = String::from_utf8_lossy(&ldd.stdout);

    let cuda_line = listing
        .lines()
        .find(|line| line.contains("libtorch_cuda.so"))
        .unwrap_or_else(|| panic!("libtorch_cuda.so not linked:\n{listing}"));
    assert!(!cuda_line.contains("not found"), "{cuda_line}");
    assert!(!listing.contains("not found"), "{listing}");
}

#[test]
fn config_check_accepts_the_shipped_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rebeld.toml");
    let out = output(rebeld().args(["config", "check"]).arg(path));

    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("[train]"));
}

#[test]
fn config_check_masks_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "[server]\nadmin_tokens = [\"swordfish\"]\n");
    let out = output(rebeld().args(["config", "check"]).arg(&path));

    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("swordfish"));
}

/// Each bad config exits 2 with one line naming the key and the value.
#[test]
fn config_check_refuses_bad_values_with_one_line() {
    let cases = [
        ("[train]\nlerning_rate = 0.5\n", "lerning_rate", "0.5"),
        (
            "[train]\nlearning_rate = -0.01\n",
            "train.learning_rate",
            "-0.01",
        ),
        (
            "[server]\nlisten = \"not an address\"\n",
            "server.listen",
            "not an address",
        ),
        ("[train]\nradius = -0.5\n", "train.radius", "-0.5"),
    ];
    let dir = tempfile::tempdir().expect("tempdir");

    for (body, key, value) in cases {
        let path = write_config(dir.path(), body);
        let out = output(rebeld().args(["config", "check"]).arg(&path));
        let stderr = String::from_utf8_lossy(&out.stderr);

        assert_eq!(out.status.code(), Some(2), "{body}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{body}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(value),
            "{body}: {stderr}"
        );
    }
}

#[test]
fn config_check_of_a_missing_file_exits_2() {
    let out = output(rebeld().args(["config", "check", "/nonexistent/rebeld.toml"]));

    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/rebeld.toml"));
}

/// `rebeld eval` of a model against itself: every margin is 0, so every pair is a tie.
#[test]
fn eval_reports_pairs_accuracy_and_margin() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval/pairs.jsonl");
    let out = output(
        rebeld()
            .args(["eval", "--model", TINY_MODEL, "--reference", TINY_MODEL])
            .args(["--device", "cpu", "--data"])
            .arg(&data),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "pairs 6",
            "skipped 3",
            "accuracy 0.500000",
            "mean_margin 0.000000"
        ]
    );

    let out = output(
        rebeld()
            .args(["eval", "--model", TINY_MODEL, "--reference", TINY_MODEL])
            .args(["--device", "tpu", "--data"])
            .arg(&data),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("tpu"));
}

/// Starts `rebeld run` and waits for its start-up line; returns the child and its stderr lines.
fn start_daemon(config: &Path) -> (Child, mpsc::Receiver<String>) {
    let mut child = rebeld()
        .args(["run", "--config"])
        .arg(config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn rebeld run");

    let stderr = child.stderr.take().expect("stderr");
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) if line.contains("rebeld started") => return (child, lines_rx),
            Ok(_) => continue,
            Err(_) => {
                let _ = child.kill();
                panic!("rebeld run did not report start-up within 60 s");
            }
        }
    }
}

fn wait_with_deadline(child: &mut Child, deadline: Duration) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn sigterm_stops_a_running_daemon_cleanly_within_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("var");
    let body = format!(
        "[runtime]\ndevice = \"cpu\"\ndata_dir = {data_dir:?}\nshutdown_timeout = \"10s\"\n\
         [model]\npath = {TINY_MODEL:?}\n\
         [server]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n"
    );
    let config = write_config(dir.path(), &body);
    let (mut child, lines) = start_daemon(&config);
    let bootstrap_file = data_dir.join("embedded-brokers");
    let bootstrap = std::fs::read_to_string(&bootstrap_file).expect("bootstrap file");
    assert!(bootstrap.trim().contains(':'), "{bootstrap}");

    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on a child process we own; no memory is shared.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = wait_with_deadline(&mut child, Duration::from_secs(10));

    let log: Vec<String> = lines.try_iter().collect();
    let Some(status) = status else {
        let _ = child.kill();
        panic!("still running 10 s after SIGTERM; log:\n{}", log.join("\n"));
    };
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        log.join("\n")
    );
    assert!(
        log.iter().any(|l| l.contains("rebeld stopped")),
        "{}",
        log.join("\n")
    );
    assert!(
        !bootstrap_file.exists(),
        "a stopped cluster's address must not linger"
    );
}

#[test]
fn a_second_daemon_on_the_same_data_folder_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("var");
    let body = format!(
        "[runtime]\ndevice = \"cpu\"\ndata_dir = {data_dir:?}\n[model]\npath = {TINY_MODEL:?}\n\
         [server]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n"
    );
    let config = write_config(dir.path(), &body);
    let (mut first, _lines) = start_daemon(&config);

    let second = output(rebeld().args(["run", "--config"]).arg(&config));
    let _ = first.kill();
    let _ = first.wait();

    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another rebeld"), "{stderr}");
}

#[test]
fn a_taken_port_fails_start_up_with_exit_1_and_names_the_listener() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let body = format!(
        "[runtime]\ndevice = \"cpu\"\ndata_dir = {:?}\n[server]\nlisten = \"127.0.0.1:{port}\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
        dir.path().join("var")
    );
    let config = write_config(dir.path(), &body);

    let out = output(rebeld().args(["run", "--config"]).arg(&config));
    let stderr = String::from_utf8_lossy(&out.stderr);

    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("server.listen"), "{stderr}");
}

#[test]
fn import_gguf_writes_a_folder_that_generate_answers_with() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("tiny");
    let gguf = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-llama-gguf/tiny-llama.gguf"
    );
    let imported = output(rebeld().args(["import", "gguf", gguf]).arg(&out));
    assert!(imported.status.success(), "{imported:?}");
    assert!(String::from_utf8_lossy(&imported.stdout).contains("21 tensors"));

    let again = output(rebeld().args(["import", "gguf", gguf]).arg(&out));
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let generated = output(
        rebeld()
            .args([
                "generate",
                "--prompt",
                "the cat",
                "--max-new-tokens",
                "6",
                "--model",
            ])
            .arg(&out),
    );
    assert!(generated.status.success(), "{generated:?}");
    assert!(!generated.stdout.is_empty());

    let bad = output(
        rebeld()
            .args(["generate", "--prompt", "hi", "--top-p", "0", "--model"])
            .arg(&out),
    );
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("top-p"));
}
