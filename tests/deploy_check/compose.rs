//! `deploy/compose.yaml` against the configuration it mounts, the image, Kafka, Prometheus
//! and Grafana.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rebeld::config::{Brokers, Config};
use serde_json::Value;

use super::dockerfile::Image;
use super::{flag_value, grace_problem, load_config, normalize, rules_jobs, strings, Tree};

const COMPOSE: &str = "deploy/compose.yaml";
const RULES: &str = "deploy/prometheus/rules.yml";
const DASHBOARDS: &str = "dashboards";

/// One service of the compose file.
struct Service<'a> {
    name: &'a str,
    spec: &'a Value,
}

impl Service<'_> {
    /// `(host path or volume name, container path)` of every mount; host paths relative to
    /// the repository root.
    fn mounts(&self) -> Vec<(String, String)> {
        strings(&self.spec["volumes"])
            .iter()
            .filter_map(|mount| {
                let mut parts = mount.split(':');
                let (source, target) = (parts.next()?, parts.next()?);
                let source = if source.starts_with('.') || source.starts_with('/') {
                    normalize(&Path::new("deploy").join(source))
                        .to_string_lossy()
                        .into_owned()
                } else {
                    source.to_owned()
                };
                Some((source, target.to_owned()))
            })
            .collect()
    }

    /// The file of the tree a container path is mounted from.
    fn host_file(&self, path: &str) -> Result<PathBuf, String> {
        let mounts = self.mounts();
        let (source, rest) = super::through_mounts(&mounts, path)
            .ok_or_else(|| format!("{COMPOSE}: {} mounts nothing at {path}", self.name))?;
        Ok(normalize(&Path::new(source).join(rest)))
    }

    /// Container ports it publishes.
    fn container_ports(&self) -> BTreeSet<u16> {
        strings(&self.spec["ports"])
            .iter()
            .filter_map(|port| port.rsplit(':').next()?.split('/').next()?.parse().ok())
            .collect()
    }

    /// Its environment, interpolated as compose would with the required variables set.
    fn environment(&self) -> BTreeMap<String, String> {
        match &self.spec["environment"] {
            Value::Object(map) => map
                .iter()
                .map(|(k, v)| (k.clone(), interpolate(v.as_str().unwrap_or_default())))
                .collect(),
            list => strings(list)
                .iter()
                .filter_map(|entry| entry.split_once('='))
                .map(|(k, v)| (k.to_owned(), interpolate(v)))
                .collect(),
        }
    }

    fn command(&self) -> Vec<String> {
        strings(&self.spec["command"])
    }
}

/// `${NAME:?message}` and `${NAME}` become `test-NAME`, `${NAME:-default}` its default and
/// `$$` a dollar sign, as `docker compose` does with the required variables exported.
pub fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((inner, tail)) = after.strip_prefix('{').and_then(|a| a.split_once('}'))
        {
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner.split([':', '?']).next().unwrap_or(inner), None),
            };
            out.push_str(&default.map_or_else(|| format!("test-{name}"), str::to_owned));
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The file of the tree that `service` mounts at the container path `path`.
pub fn compose_host_file(tree: &Tree, service: &str, path: &str) -> Result<PathBuf, String> {
    let compose = tree
        .yaml(Path::new(COMPOSE))?
        .into_iter()
        .next()
        .unwrap_or_default();
    let spec = &compose["services"][service];
    Service {
        name: service,
        spec,
    }
    .host_file(path)
}

/// Problems of the compose deployment.
pub fn compose_problems(tree: &Tree) -> Vec<String> {
    super::collect(tree, check)
}

fn check(tree: &Tree, problems: &mut Vec<String>) -> Result<(), String> {
    let compose = tree
        .yaml(Path::new(COMPOSE))?
        .into_iter()
        .next()
        .ok_or("empty compose file")?;
    let service = |name: &'static str| {
        let spec = &compose["services"][name];
        (!spec.is_null())
            .then_some(Service { name, spec })
            .ok_or_else(|| format!("{COMPOSE} has no service {name}"))
    };
    let rebeld = service("rebeld")?;
    let image = Image::read(tree)?;
    let config = rebeld_config(tree, &rebeld, &image)?;

    problems.extend(image.problems(&config, COMPOSE));
    rebeld_problems(&rebeld, &config, problems);
    kafka_problems(&compose, &config, problems);
    let prometheus = service("prometheus")?;
    let prometheus_port = prometheus_problems(tree, &prometheus, &rebeld, &config, problems)?;
    grafana_problems(tree, &service("grafana")?, prometheus_port, problems)
}

/// The configuration the rebeld service runs with: its `--config` file, through its mounts,
/// with its environment.
fn rebeld_config(tree: &Tree, rebeld: &Service<'_>, image: &Image) -> Result<Config, String> {
    let command = match rebeld.command() {
        command if command.is_empty() => image.cmd.clone(),
        command => command,
    };
    let path = flag_value(&command, "--config").ok_or("the rebeld service has no --config")?;
    let file = rebeld.host_file(path)?;
    let text = tree.text(&file)?;
    load_config(&file.to_string_lossy(), text, &rebeld.environment())
}

fn rebeld_problems(rebeld: &Service<'_>, config: &Config, problems: &mut Vec<String>) {
    let listeners = BTreeSet::from([config.server.listen.port(), config.metrics.listen.port()]);
    if rebeld.container_ports() != listeners {
        problems.push(format!(
            "{COMPOSE}: rebeld publishes {:?}, its config listens on {listeners:?}",
            rebeld.container_ports()
        ));
    }
    let mounts = rebeld.mounts();
    let data_dir = config.runtime.data_dir.to_string_lossy();
    if !mounts.iter().any(|(_, target)| *target == data_dir) {
        problems.push(format!(
            "{COMPOSE}: no volume at runtime.data_dir = {data_dir}"
        ));
    }
    let model = config.model.path.to_string_lossy();
    if super::through_mounts(&mounts, &model).is_none() {
        problems.push(format!(
            "{COMPOSE}: nothing mounted at model.path = {model}"
        ));
    }
    let grace = rebeld.spec["stop_grace_period"].as_str().unwrap_or("10s");
    match humantime::parse_duration(grace) {
        Ok(grace) => problems.extend(grace_problem("stop_grace_period", grace, config)),
        Err(e) => problems.push(format!("{COMPOSE}: stop_grace_period {grace}: {e}")),
    }
}

/// Every bootstrap address is a service's advertised listener, and the topic service creates
/// every topic rebeld uses.
fn kafka_problems(compose: &Value, config: &Config, problems: &mut Vec<String>) {
    let Brokers::Bootstrap(list) = &config.kafka.brokers else {
        problems.push(format!("{COMPOSE}: rebeld uses the embedded broker"));
        return;
    };
    for address in list.split(',') {
        let host = address.split(':').next().unwrap_or_default();
        let advertised = compose["services"][host]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
            .as_str()
            .unwrap_or_default();
        if !advertised.contains(&format!("//{address}")) {
            problems.push(format!(
                "{COMPOSE}: kafka.brokers names {address}, not an advertised listener of a \
                 service {host} ({advertised:?})"
            ));
        }
    }
    let created = strings(&compose["services"]["topics"]["command"]).join(" ");
    let topic_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let words: BTreeSet<&str> = created.split(|c| !topic_char(c)).collect();
    for topic in [
        &config.kafka.topic,
        &config.kafka.dead_letter_topic,
        &config.kafka.checkpoints_topic,
    ] {
        if !words.contains(topic.as_str()) {
            problems.push(format!(
                "{COMPOSE}: the topics service does not create {topic}"
            ));
        }
    }
}

/// Checks the Prometheus service's rule file and scrape job; answers its listening port.
fn prometheus_problems(
    tree: &Tree,
    prometheus: &Service<'_>,
    rebeld: &Service<'_>,
    config: &Config,
    problems: &mut Vec<String>,
) -> Result<u16, String> {
    let command = prometheus.command();
    let file = prometheus.host_file(flag_value(&command, "--config.file").unwrap_or(""))?;
    let scrape = tree.yaml(&file)?.into_iter().next().unwrap_or_default();

    let rule_files: Vec<PathBuf> = strings(&scrape["rule_files"])
        .iter()
        .map(|path| prometheus.host_file(path))
        .collect::<Result<_, _>>()?;
    if rule_files != [PathBuf::from(RULES)] {
        problems.push(format!(
            "{}: rule files {rule_files:?}, not {RULES}",
            file.display()
        ));
    }

    let target = format!("{}:{}", rebeld.name, config.metrics.listen.port());
    let jobs = rules_jobs(tree)?;
    let scrapes_rebeld = scrape["scrape_configs"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|job| {
            let targets = job["static_configs"].as_array().into_iter().flatten();
            let path = job["metrics_path"].as_str().unwrap_or("/metrics");
            job["job_name"]
                .as_str()
                .is_some_and(|name| jobs.contains(name))
                && path == "/metrics"
                && targets
                    .flat_map(|c| strings(&c["targets"]))
                    .any(|t| t == target)
        });
    if !scrapes_rebeld {
        problems.push(format!(
            "{}: no job named as in the rules ({jobs:?}) scrapes {target}/metrics",
            file.display()
        ));
    }
    let listen = flag_value(&command, "--web.listen-address").unwrap_or(":9090");
    listen
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .ok_or_else(|| format!("{COMPOSE}: prometheus listens on {listen}"))
}

/// The datasource points at the Prometheus service, the dashboard provider at `dashboards/`.
fn grafana_problems(
    tree: &Tree,
    grafana: &Service<'_>,
    prometheus_port: u16,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    let provisioning = grafana.host_file("/etc/grafana/provisioning")?;
    let documents = |kind: &str| -> Result<Vec<Value>, String> {
        let folder = provisioning.join(kind);
        let mut all = Vec::new();
        for (path, _) in tree.under(&folder) {
            all.extend(tree.yaml(path)?);
        }
        Ok(all)
    };

    let url = format!("http://prometheus:{prometheus_port}");
    let datasources = documents("datasources")?;
    let sources = datasources
        .iter()
        .flat_map(|d| d["datasources"].as_array())
        .flatten();
    if !sources
        .filter(|s| s["type"] == "prometheus")
        .any(|s| s["url"].as_str() == Some(url.as_str()))
    {
        problems.push(format!(
            "grafana provisions no prometheus datasource at {url}"
        ));
    }

    let providers = documents("dashboards")?;
    let paths: Vec<PathBuf> = providers
        .iter()
        .flat_map(|d| d["providers"].as_array())
        .flatten()
        .filter_map(|p| p["options"]["path"].as_str())
        .map(|path| grafana.host_file(path))
        .collect::<Result<_, _>>()?;
    if paths != [PathBuf::from(DASHBOARDS)] {
        problems.push(format!(
            "grafana loads dashboards from {paths:?}, not {DASHBOARDS}"
        ));
    }
    if tree.under(Path::new(DASHBOARDS)).next().is_none() {
        problems.push(format!("{DASHBOARDS} holds no dashboard"));
    }
    Ok(())
}
