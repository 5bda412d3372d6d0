//! A real Prometheus server scrapes a real daemon that ingests HH-RLHF events, trains and
//! publishes: every dashboard query and every rule is accepted, and the ingest, training and
//! checkpoint panels return data.

mod support;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{free_port, http_get, replay_hh, wait_for, Daemon, DaemonConfig, Tansu};

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/rules.yml");
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/rebeld.json");
/// Rows whose every panel must show data once the daemon has ingested, trained and published.
const ROWS_WITH_DATA: [&str; 3] = ["Ingest", "Training", "Checkpoints and serving"];
/// Panels of those rows that chart events this run does not cause, with the reason.
const QUIET_PANELS: [(&str, &str); 1] = [(
    "Downloads refused",
    "nothing downloads at the cap; the series exists, but the panel only charts refusals",
)];

/// `prometheus` on a free loopback port, scraping `target` every second as job `rebeld`.
struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    fn start(dir: &Path, target: &str) -> Self {
        let port = free_port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [{RULES:?}]\n\
                 scrape_configs:\n  - job_name: rebeld\n    static_configs:\n\
                 \x20     - targets: [{target:?}]\n"
            ),
        )
        .expect("prometheus.yml");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package, installed by scripts/setup)");
        let server = Self { child, port };
        wait_for("prometheus to listen", Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        server
    }

    /// `/api/v1/query` of `promql`: the JSON answer.
    fn query(&self, promql: &str) -> Value {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (_, body) = http_get(self.port, &path).expect("query");
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    fn get(&self, path: &str) -> Value {
        let (_, body) = http_get(self.port, path).expect("request");
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Dashboard panels by row title, each with its title and queries (variables filled in).
fn dashboard_queries() -> BTreeMap<String, Vec<(String, Vec<String>)>> {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("dashboard"))
            .expect("JSON");
    let mut rows: BTreeMap<String, Vec<(String, Vec<String>)>> = BTreeMap::new();
    let mut row = String::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        if panel["type"] == "row" {
            row = title;
            continue;
        }
        let queries = panel["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["expr"].as_str())
            .map(|expr| expr.replace("$job", "rebeld").replace("$instance", ".*"))
            .collect();
        rows.entry(row.clone()).or_default().push((title, queries));
    }
    rows
}

fn has_data(answer: &Value) -> bool {
    answer["data"]["result"]
        .as_array()
        .is_some_and(|result| !result.is_empty())
}

#[test]
fn a_real_prometheus_scrapes_the_daemon_and_every_query_and_rule_works() {
    let _serial = support::serial();
    let broker = Tansu::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = "[train]\nmin_pairs = 16\nbatch_size = 8\nmicro_batch_size = 8\n\
                 learning_rate = 1e-3\nwarmup_steps = 0\n\
                 [checkpoint]\npublish_every_steps = 3\nmin_new_pairs = 8\n\
                 holdout_fraction = 0.2\nmax_kl = 1e9\nmax_accuracy_drop = 1.0\n";
    let config = DaemonConfig::new(&dir.path().join("data"), &broker.bootstrap, extra);
    let daemon = Daemon::start(&config);
    replay_hh(&broker.bootstrap, &[]);
    let target = format!("127.0.0.1:{}", daemon.metrics_port);
    let prometheus = Prometheus::start(dir.path(), &target);

    wait_for("two published versions", Duration::from_secs(300), || {
        daemon
            .metric("rebeld_checkpoint_versions_published_total")
            .is_some_and(|n| n >= 2.0)
    });
    // A download and a long poll, so the serving panels have something to show.
    let (status, _) =
        http_get(daemon.api_port, "/v1/versions/1/files/config.json").expect("download");
    assert_eq!(status, 200);
    wait_for(
        "scrapes after the publications",
        Duration::from_secs(60),
        || {
            has_data(
                &prometheus
                    .query("rebeld_checkpoint_versions_published_total{job=\"rebeld\"} >= 2"),
            )
        },
    );
    // The lag comes from librdkafka's statistics, emitted every 10 s: the slowest series.
    wait_for("the consumer lag series", Duration::from_secs(60), || {
        has_data(&prometheus.query("rebeld_ingest_consumer_lag_messages{job=\"rebeld\"}"))
    });
    // Rates need two samples of the final counts.
    std::thread::sleep(Duration::from_secs(3));

    for (row, panels) in dashboard_queries() {
        for (title, queries) in panels {
            let answers: Vec<Value> = queries.iter().map(|q| prometheus.query(q)).collect();
            for (query, answer) in queries.iter().zip(&answers) {
                assert_eq!(
                    answer["status"], "success",
                    "{row} / {title}: {query}: {answer}"
                );
            }
            let quiet = QUIET_PANELS.iter().any(|(name, _)| *name == title);
            if ROWS_WITH_DATA.contains(&row.as_str()) && !quiet {
                assert!(
                    answers.iter().any(has_data),
                    "{row} / {title} shows no data: {queries:?}"
                );
            }
        }
    }

    wait_for("every rule evaluated", Duration::from_secs(30), || {
        let rules = prometheus.get("/api/v1/rules");
        let groups = rules["data"]["groups"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let all: Vec<Value> = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        all.len() >= 11 && all.iter().all(|r| r["health"] == "ok")
    });
    let status = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
}
