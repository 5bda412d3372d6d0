//! The deployment files under `deploy/` against each other and the code: every YAML and JSON
//! file parses; compose and Kubernetes publish the ports their mounted configurations listen
//! on, probe `/healthz` and `/readyz`, keep `runtime.data_dir` on a volume and mount
//! configurations rebeld accepts; Prometheus loads the rules and scrapes the metrics port;
//! Grafana loads `dashboards/`; every metric named is catalogued. A change made on one side
//! only is caught (the last test edits one file at a time and expects a complaint).

mod deploy_check;

use std::path::Path;

use deploy_check::{
    compose_host_file, compose_problems, k8s_problems, metric_names, metric_problems,
    parse_problems, systemd_problems, toolchain_problems, Tree,
};

#[test]
fn every_yaml_file_under_deploy_and_every_json_file_parses() {
    let (read, problems) = parse_problems(&Tree::load());

    assert!(problems.is_empty(), "{problems:#?}");
    assert!(read >= 12, "only {read} files read");
}

#[test]
fn compose_agrees_with_its_config_the_image_kafka_prometheus_and_grafana() {
    let problems = compose_problems(&Tree::load());

    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn kubernetes_agrees_with_its_config_the_secret_the_image_and_the_rules() {
    let problems = k8s_problems(&Tree::load());

    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_systemd_unit_waits_for_the_resume_state_and_may_write_the_data_dir() {
    let problems = systemd_problems(&Tree::load());

    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_image_builds_with_the_declared_rust_version_and_the_setup_torch() {
    let problems = toolchain_problems(&Tree::load());

    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn every_metric_named_under_deploy_is_catalogued() {
    let tree = Tree::load();
    let named: usize = tree
        .under(Path::new("deploy"))
        .map(|(_, text)| metric_names(text).len())
        .sum();

    assert!(named >= 10, "only {named} metric names found");
    let problems = metric_problems(&tree);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Every problem any checker finds.
fn all_problems(tree: &Tree) -> Vec<String> {
    let mut problems = compose_problems(tree);
    problems.extend(k8s_problems(tree));
    problems.extend(metric_problems(tree));
    problems.extend(systemd_problems(tree));
    problems.extend(toolchain_problems(tree));
    problems
}

/// `(text, replacement, a word the complaint must contain)`.
type Edit = (&'static str, &'static str, &'static str);

/// Edits of one file each.
const ONE_SIDED_CHANGES: &[(&str, &[Edit])] = &[
    (
        "deploy/compose.yaml",
        &[
            ("\"9464:9464\"", "\"9465:9465\"", "9465"),
            ("READ_TOKENS", "READ_TOKEN", "read_token"),
            (
                "listen-address=:9090",
                "listen-address=:9091",
                "prometheus:9091",
            ),
            (
                "stop_grace_period: 90s",
                "stop_grace_period: 60s",
                "stop_grace_period",
            ),
        ],
    ),
    (
        "deploy/compose/rebeld.toml",
        &[
            ("0.0.0.0:8080", "0.0.0.0:8081", "8081"),
            ("\"/var/lib/rebeld\"", "\"/data\"", "/data"),
            ("\"kafka:9092\"", "\"kafka:9093\"", "kafka:9093"),
            ("\"rebeld.checkpoints\"", "\"notices\"", "notices"),
            ("\"60s\"", "\"75s\"", "stop_grace_period"),
            ("[server]", "[server]\nradius = 1", "server.radius"),
        ],
    ),
    (
        "deploy/docker/Dockerfile",
        &[
            ("EXPOSE 8080 9464", "EXPOSE 8080 9465", "9465"),
            ("127.0.0.1:8080/healthz", "127.0.0.1:8081/healthz", "8081"),
            ("VOLUME /var/lib/rebeld", "VOLUME /data", "volumes"),
            ("USER rebeld", "USER root", "non-root"),
            (
                "RUST_VERSION=1.89.0",
                "RUST_VERSION=1.88.0",
                "Cargo.toml says 1.89",
            ),
            (
                "TORCH_VERSION=2.11.0",
                "TORCH_VERSION=2.10.0",
                "TORCH_VERSION=2.10.0",
            ),
        ],
    ),
    (
        "deploy/prometheus/prometheus.yml",
        &[
            ("rebeld:9464", "rebeld:9465", "rebeld:9464"),
            ("rules/rebeld.yml", "rules/other.yml", "other.yml"),
            ("job_name: rebeld", "job_name: trainer", "no job named"),
        ],
    ),
    (
        "deploy/prometheus/rules.yml",
        &[(
            "steps_total[30m]",
            "step_total[30m]",
            "rebeld_train_step_total",
        )],
    ),
    (
        "deploy/grafana/provisioning/dashboards/rebeld.yaml",
        &[(
            "dashboards/rebeld\n",
            "dashboards/other\n",
            "dashboards/other",
        )],
    ),
    (
        "deploy/grafana/provisioning/datasources/prometheus.yaml",
        &[("prometheus:9090", "prometheus:9091", "datasource")],
    ),
    (
        "deploy/k8s/configmap.yaml",
        &[
            ("0.0.0.0:9464", "0.0.0.0:9465", "9465"),
            ("radius = 0.1", "radius = -1", "train.radius"),
            ("max_kl = 0.02", "max_kl = 0.5", "checkpoint.max_kl"),
            (
                "shutdown_timeout = \"120s\"",
                "shutdown_timeout = \"160s\"",
                "GracePeriod",
            ),
        ],
    ),
    (
        "deploy/k8s/statefulset.yaml",
        &[
            ("containerPort: 8080", "containerPort: 8081", "8081"),
            ("path: /readyz", "path: /healthz", "readinessProbe"),
            ("mountPath: /var/lib/rebeld", "mountPath: /data", "data_dir"),
            (
                "GracePeriodSeconds: 180",
                "GracePeriodSeconds: 130",
                "GracePeriod",
            ),
            ("runAsUser: 10001", "runAsUser: 0", "non-root"),
            (
                "readOnlyRootFilesystem: true",
                "readOnlyRootFilesystem: false",
                "read-only",
            ),
            ("path: kafka-ca.pem", "path: ca.pem", "ssl.ca.location"),
            ("mountPath: /models", "mountPath: /policy", "model.path"),
        ],
    ),
    (
        "deploy/k8s/service.yaml",
        &[
            ("targetPort: metrics", "targetPort: 9465", "9465"),
            ("clusterIP: None", "type: ClusterIP", "headless"),
        ],
    ),
    (
        "deploy/k8s/servicemonitor.yaml",
        &[(
            "jobLabel: app.kubernetes.io/name",
            "jobLabel: app.kubernetes.io/component",
            "job",
        )],
    ),
    (
        "deploy/k8s/secret.yaml",
        &[
            ("READ_TOKENS", "READ_TOKEN", "read_token"),
            ("REPLACE_ME-kafka-sasl-password", "hunter2", "placeholder"),
        ],
    ),
    (
        "deploy/systemd/rebeld.service",
        &[
            ("TimeoutStopSec=150", "TimeoutStopSec=130", "TimeoutStopSec"),
            (
                "ReadWritePaths=/var/lib/rebeld",
                "ReadWritePaths=/var/lib",
                "ReadWritePaths",
            ),
        ],
    ),
    (
        "deploy/k8s/kustomization.yaml",
        &[("  - servicemonitor.yaml\n", "", "kustomization")],
    ),
];

#[test]
fn every_one_sided_change_is_caught() {
    let tree = Tree::load();
    assert!(all_problems(&tree).is_empty());
    let mut missed = Vec::new();

    for (file, edits) in ONE_SIDED_CHANGES {
        for (from, to, word) in *edits {
            let problems = all_problems(&tree.with_edit(file, from, to));
            if !problems.iter().any(|problem| problem.contains(word)) {
                missed.push(format!("{file}: {from:?} -> {to:?} gave {problems:?}"));
            }
        }
    }
    assert!(missed.is_empty(), "{missed:#?}");
}

#[test]
fn compose_interpolation_sets_required_variables_and_keeps_defaults() {
    use deploy_check::interpolate;

    assert_eq!(interpolate("[\"${TOKEN:?set it}\"]"), "[\"test-TOKEN\"]");
    assert_eq!(
        interpolate("${LEVEL:-info} $$HOME ${X}"),
        "info $HOME test-X"
    );
}

#[test]
fn promtool_accepts_the_compose_prometheus_config_with_its_mounted_rules() {
    let tree = Tree::load();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = "deploy/prometheus/prometheus.yml";
    let mut text = tree.text(Path::new(config)).expect("config").to_owned();
    let parsed = deploy_check::yaml_documents(&text).expect("YAML");
    for rule_file in deploy_check::strings(&parsed[0]["rule_files"]) {
        let host = compose_host_file(&tree, "prometheus", &rule_file).expect("mounted");
        text = text.replace(&rule_file, &root.join(host).to_string_lossy());
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("prometheus.yml");
    std::fs::write(&copy, text).expect("copy");

    let output = std::process::Command::new("promtool")
        .args(["check", "config"])
        .arg(&copy)
        .output()
        .expect("promtool (Debian package prometheus, installed by scripts/setup)");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(report.contains("SUCCESS: 1 rule files found"), "{report}");
}
