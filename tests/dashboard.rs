//! `dashboards/rebeld.json` against the metric catalogue: structure, and names on both sides.

use std::collections::BTreeSet;

use rebeld::metrics::CATALOGUE;
use serde_json::Value;

/// Catalogued metrics deliberately not charted, with the reason.
const NOT_CHARTED: &[(&str, &str)] = &[];

/// Series suffixes Prometheus adds to histograms.
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

fn dashboard() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/rebeld.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON")
}

fn panels(dashboard: &Value) -> Vec<&Value> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect()
}

/// Every `rebeld_*` or `process_*` metric name in a PromQL expression, histogram suffixes
/// stripped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut start = None;
    for (i, &b) in bytes.iter().chain(std::iter::once(&b' ')).enumerate() {
        let word = b.is_ascii_alphanumeric() || b == b'_';
        match (word, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                let token = &expr[s..i];
                if token.starts_with("rebeld_") || token.starts_with("process_") {
                    let base = HISTOGRAM_SUFFIXES
                        .iter()
                        .find_map(|suffix| token.strip_suffix(suffix))
                        .unwrap_or(token);
                    names.insert(base.to_owned());
                }
                start = None;
            }
            _ => {}
        }
    }
    names
}

#[test]
fn panels_have_unique_ids_titles_units_descriptions_and_targets() {
    let dashboard = dashboard();
    let mut ids = BTreeSet::new();

    for panel in panels(&dashboard) {
        let id = panel["id"].as_i64().expect("id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        assert!(
            panel["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{panel}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert!(
            panel["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{}",
            panel["title"]
        );
        assert!(
            panel["fieldConfig"]["defaults"]["unit"].is_string(),
            "{}",
            panel["title"]
        );
        assert!(panel["datasource"]["uid"].is_string(), "{}", panel["title"]);
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            assert!(
                target["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "{}",
                panel["title"]
            );
        }
    }
}

#[test]
fn dashboard_has_datasource_job_and_instance_variables() {
    let dashboard = dashboard();
    let names: BTreeSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();

    assert_eq!(names, BTreeSet::from(["datasource", "job", "instance"]));
}

#[test]
fn dashboard_uses_only_catalogued_metrics_and_shows_every_one() {
    let dashboard = dashboard();
    let catalogued: BTreeSet<&str> = CATALOGUE.iter().map(|spec| spec.name).collect();
    let mut used = BTreeSet::new();
    for panel in panels(&dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            used.extend(metric_names(target["expr"].as_str().unwrap_or_default()));
        }
    }

    for name in &used {
        let known = catalogued.contains(name.as_str()) || name.starts_with("process_");
        assert!(
            known,
            "dashboard uses {name}, which the catalogue does not define"
        );
    }
    let not_charted: BTreeSet<&str> = NOT_CHARTED.iter().map(|(name, _)| *name).collect();
    for name in catalogued {
        assert!(
            used.contains(name) || not_charted.contains(name),
            "catalogued metric {name} is neither charted nor listed as not charted"
        );
    }
}

#[test]
fn metric_names_are_extracted_from_promql() {
    let names =
        metric_names("sum(rate(rebeld_x_total{job=~\"$job\"}[5m])) / process_cpu_seconds_total");
    assert_eq!(
        names,
        BTreeSet::from(["rebeld_x_total".into(), "process_cpu_seconds_total".into()])
    );

    let histogram = metric_names("histogram_quantile(0.5, rate(rebeld_t_seconds_bucket[1m]))");
    assert_eq!(histogram, BTreeSet::from(["rebeld_t_seconds".into()]));
}

/// The `expr:` lines of `deploy/prometheus/rules.yml` (each rule's expression is one line).
fn rule_expressions() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/rules.yml");
    let text = std::fs::read_to_string(path).expect("rules.yml");
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("expr:"))
        .map(|expr| expr.trim().to_owned())
        .collect()
}

#[test]
fn rules_use_only_catalogued_metrics_and_every_alert_has_severity_and_runbook() {
    let catalogued: BTreeSet<&str> = CATALOGUE.iter().map(|spec| spec.name).collect();
    let expressions = rule_expressions();
    assert!(expressions.len() >= 8, "{expressions:?}");
    for expr in &expressions {
        for name in metric_names(expr) {
            assert!(
                catalogued.contains(name.as_str()),
                "rules use {name}, not catalogued"
            );
        }
    }

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/rules.yml");
    let text = std::fs::read_to_string(path).expect("rules.yml");
    let alerts = text.split("- alert:").skip(1).collect::<Vec<_>>();
    assert!(alerts.len() >= 7, "{} alerts", alerts.len());
    for alert in alerts {
        let name = alert.lines().next().unwrap_or_default().trim();
        assert!(alert.contains("severity:"), "{name} has no severity");
        assert!(alert.contains("runbook:"), "{name} has no runbook line");
    }
}

#[test]
fn promtool_accepts_the_rules() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/rules.yml");
    let output = std::process::Command::new("promtool")
        .args(["check", "rules", path])
        .output()
        .expect("promtool (Debian package prometheus, installed by scripts/setup)");
    assert!(output.status.success(), "{output:?}");
}
