//! `deploy/k8s/` against the configuration its ConfigMap holds, the Secret, the image and the
//! Prometheus rules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rebeld::config::{Config, ENV_PREFIX};
use serde_json::Value;

use super::dockerfile::Image;
use super::{flag_value, grace_problem, load_config, rules_jobs, strings, Tree};

const FOLDER: &str = "deploy/k8s";
const PRODUCTION: &str = "config/production.toml";
/// Keys the ConfigMap's configuration may set differently from `config/production.toml`.
const ADAPTED_KEYS: [&str; 2] = ["kafka.brokers", "server.public_url"];
/// Marks every placeholder a cluster operator must replace.
const PLACEHOLDER: &str = "REPLACE_ME";

/// The objects of `deploy/k8s/`, and the files the kustomization lists.
struct Objects {
    all: Vec<Value>,
    listed: BTreeSet<String>,
    files: BTreeSet<String>,
}

impl Objects {
    fn read(tree: &Tree) -> Result<Self, String> {
        let mut objects = Self {
            all: Vec::new(),
            listed: BTreeSet::new(),
            files: BTreeSet::new(),
        };
        for (path, _) in tree.under(Path::new(FOLDER)) {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            for document in tree.yaml(path)? {
                if document["kind"] == "Kustomization" {
                    objects.listed.extend(strings(&document["resources"]));
                } else {
                    objects.files.insert(name.to_string());
                    objects.all.push(document);
                }
            }
        }
        Ok(objects)
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> {
        self.all.iter().filter(move |o| o["kind"] == kind)
    }

    fn named(&self, kind: &str, name: &str) -> Result<&Value, String> {
        self.all
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .ok_or_else(|| format!("{FOLDER} has no {kind} {name}"))
    }
}

/// The rebeld container of the StatefulSet, with its pod.
struct Pod<'a> {
    set: &'a Value,
    spec: &'a Value,
    container: &'a Value,
}

impl<'a> Pod<'a> {
    fn find(objects: &'a Objects) -> Result<Self, String> {
        let set = objects
            .of_kind("StatefulSet")
            .next()
            .ok_or("no StatefulSet")?;
        let spec = &set["spec"]["template"]["spec"];
        let container = spec["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == "rebeld")
            .ok_or("the StatefulSet has no container rebeld")?;
        Ok(Self {
            set,
            spec,
            container,
        })
    }

    /// `(volume name, mount path)` of the container.
    fn mounts(&self) -> Vec<(String, String)> {
        let mounts = self.container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten();
        mounts
            .filter_map(|m| Some((m["name"].as_str()?.into(), m["mountPath"].as_str()?.into())))
            .collect()
    }

    fn volume(&self, name: &str) -> Option<&'a Value> {
        let volumes = self.spec["volumes"].as_array().into_iter().flatten();
        volumes.into_iter().find(|v| v["name"] == name)
    }

    /// The ConfigMap entry `(map, key)` a container path shows, through a `configMap` or
    /// `projected` volume.
    fn config_map_entry(&self, path: &str) -> Option<(String, String)> {
        let mounts = self.mounts();
        let (volume, file) = super::through_mounts(&mounts, path)?;
        let volume = self.volume(volume)?;
        let sources = match volume["projected"]["sources"].as_array() {
            Some(sources) => sources.iter().map(|s| &s["configMap"]).collect(),
            None => vec![&volume["configMap"]],
        };
        sources.into_iter().find_map(|map| {
            let name = map["name"].as_str()?;
            let items = map["items"].as_array();
            let key = match items {
                Some(items) => items.iter().find(|i| i["path"] == file)?["key"].as_str()?,
                None => file.as_str(),
            };
            Some((name.to_owned(), key.to_owned()))
        })
    }

    /// The container port a Service or probe port (number or name) means.
    fn resolve_port(&self, port: &Value) -> Option<u16> {
        let ports = self.container["ports"].as_array().into_iter().flatten();
        let found = ports.into_iter().find(|p| match port {
            Value::String(name) => p["name"] == name.as_str(),
            number => p["containerPort"] == *number,
        })?;
        found["containerPort"].as_u64()?.try_into().ok()
    }

    fn labels(&self) -> &'a Value {
        &self.set["spec"]["template"]["metadata"]["labels"]
    }
}

/// True when every label `selector` asks for is in `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
}

/// Problems of the Kubernetes deployment.
pub fn k8s_problems(tree: &Tree) -> Vec<String> {
    super::collect(tree, check)
}

fn check(tree: &Tree, problems: &mut Vec<String>) -> Result<(), String> {
    let objects = Objects::read(tree)?;
    if objects.listed != objects.files {
        problems.push(format!(
            "kustomization lists {:?}, the folder holds {:?}",
            objects.listed, objects.files
        ));
    }
    let pod = Pod::find(&objects)?;
    let image = Image::read(tree)?;
    let config = pod_config(tree, &objects, &pod, problems)?;

    problems.extend(image.problems(&config, FOLDER));
    probe_and_port_problems(&pod, &config, problems);
    volume_problems(&objects, &pod, &config, problems);
    pod_security_problems(&pod, &image, &config, problems);
    service_problems(tree, &objects, &pod, &config, problems)
}

/// The configuration in the ConfigMap the container's `--config` shows, loaded with the
/// Secret as its environment; checks the Secret and the adaptation of production.toml.
fn pod_config(
    tree: &Tree,
    objects: &Objects,
    pod: &Pod<'_>,
    problems: &mut Vec<String>,
) -> Result<Config, String> {
    let args = strings(&pod.container["args"]);
    let path = flag_value(&args, "--config").ok_or("the container has no --config")?;
    let (map, key) = pod
        .config_map_entry(path)
        .ok_or_else(|| format!("no ConfigMap entry is mounted at {path}"))?;
    let text = objects.named("ConfigMap", &map)?["data"][&key]
        .as_str()
        .ok_or_else(|| format!("ConfigMap {map} has no {key}"))?;

    let env = container_env(objects, pod, problems)?;
    let config = load_config(&format!("ConfigMap {map} {key}"), text, &env)?;
    problems.extend(adaptation_problems(tree, text)?);
    Ok(config)
}

/// Literal `env` values and the `stringData` of every Secret in `envFrom`.
fn container_env(
    objects: &Objects,
    pod: &Pod<'_>,
    problems: &mut Vec<String>,
) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    for from in pod.container["envFrom"].as_array().into_iter().flatten() {
        let name = from["secretRef"]["name"].as_str().unwrap_or_default();
        let secret = objects.named("Secret", name)?;
        for (key, value) in secret["stringData"].as_object().into_iter().flatten() {
            let value = value.as_str().unwrap_or_default();
            if !key.starts_with(ENV_PREFIX) || !value.contains(PLACEHOLDER) {
                problems.push(format!(
                    "Secret {name}: {key} is not a {ENV_PREFIX}* override with a \
                     {PLACEHOLDER} placeholder"
                ));
            }
            env.insert(key.clone(), value.to_owned());
        }
    }
    for var in pod.container["env"].as_array().into_iter().flatten() {
        if let (Some(name), Some(value)) = (var["name"].as_str(), var["value"].as_str()) {
            env.insert(name.to_owned(), value.to_owned());
        }
    }
    Ok(env)
}

/// Keys whose values differ from `config/production.toml`, beyond [`ADAPTED_KEYS`].
fn adaptation_problems(tree: &Tree, text: &str) -> Result<Vec<String>, String> {
    let parse = |text: &str| -> Result<BTreeMap<String, String>, String> {
        let table: toml::Table = text.parse().map_err(|e| format!("{e}"))?;
        let mut flat = BTreeMap::new();
        flatten("", &toml::Value::Table(table), &mut flat);
        Ok(flat)
    };
    let production = parse(tree.text(Path::new(PRODUCTION))?)?;
    let adapted = parse(text)?;
    let keys: BTreeSet<&String> = production.keys().chain(adapted.keys()).collect();
    Ok(keys
        .into_iter()
        .filter(|key| production.get(*key) != adapted.get(*key))
        .filter(|key| !ADAPTED_KEYS.contains(&key.as_str()))
        .map(|key| format!("the ConfigMap's {key} differs from {PRODUCTION}"))
        .collect())
}

fn flatten(prefix: &str, value: &toml::Value, flat: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                let dotted = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&dotted, value, flat);
            }
        }
        other => {
            flat.insert(prefix.to_owned(), other.to_string());
        }
    }
}

fn probe_and_port_problems(pod: &Pod<'_>, config: &Config, problems: &mut Vec<String>) {
    let api = config.server.listen.port();
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &pod.container[probe]["httpGet"];
        if probe == "startupProbe" && pod.container[probe].is_null() {
            continue;
        }
        if get["path"] != path || pod.resolve_port(&get["port"]) != Some(api) {
            problems.push(format!(
                "{probe} gets {}:{}, expected {path} on {api}",
                get["port"], get["path"]
            ));
        }
    }
    let ports = pod.container["ports"].as_array().into_iter().flatten();
    let declared: BTreeSet<u64> = ports.filter_map(|p| p["containerPort"].as_u64()).collect();
    let listeners = BTreeSet::from([u64::from(api), u64::from(config.metrics.listen.port())]);
    if declared != listeners {
        problems.push(format!(
            "the container declares ports {declared:?}, its config listens on {listeners:?}"
        ));
    }
}

/// The data dir is a claim template's volume, the model and the Kafka CA are mounted.
fn volume_problems(objects: &Objects, pod: &Pod<'_>, config: &Config, problems: &mut Vec<String>) {
    let data_dir = config.runtime.data_dir.to_string_lossy();
    let claims = pod.set["spec"]["volumeClaimTemplates"]
        .as_array()
        .into_iter()
        .flatten();
    let claim_names: BTreeSet<&str> = claims
        .filter_map(|c| c["metadata"]["name"].as_str())
        .collect();
    let mounts = pod.mounts();
    if !mounts
        .iter()
        .any(|(name, path)| *path == data_dir && claim_names.contains(name.as_str()))
    {
        problems.push(format!(
            "runtime.data_dir = {data_dir} is not a volume claim template's mount"
        ));
    }
    let model = config.model.path.to_string_lossy();
    if super::through_mounts(&mounts, &model).is_none() {
        problems.push(format!("nothing is mounted at model.path = {model}"));
    }
    if let Some(ca) = config.kafka.properties.get("ssl.ca.location") {
        let shown = pod.config_map_entry(ca);
        let exists = shown.is_some_and(|(map, key)| {
            objects
                .named("ConfigMap", &map)
                .is_ok_and(|m| m["data"][&key].is_string())
        });
        if !exists {
            problems.push(format!(
                "ssl.ca.location = {ca} is not a mounted ConfigMap entry"
            ));
        }
    }
}

fn pod_security_problems(
    pod: &Pod<'_>,
    image: &Image,
    config: &Config,
    problems: &mut Vec<String>,
) {
    let security = &pod.spec["securityContext"];
    let user = security["runAsUser"].as_u64();
    if security["runAsNonRoot"] != true || user == Some(0) || user != image.uid {
        problems.push(format!(
            "the pod must run as non-root user {:?} (the image's), runs as {user:?}",
            image.uid
        ));
    }
    let container = &pod.container["securityContext"];
    if container["readOnlyRootFilesystem"] != true || container["allowPrivilegeEscalation"] != false
    {
        problems.push("the container's root filesystem must be read-only, no escalation".into());
    }
    let resources = &pod.container["resources"];
    for (kind, name) in [
        ("requests", "cpu"),
        ("requests", "memory"),
        ("limits", "memory"),
    ] {
        if resources[kind][name].is_null() {
            problems.push(format!("the container has no resources.{kind}.{name}"));
        }
    }
    if pod.set["spec"]["replicas"] != 1 {
        problems.push("the StatefulSet must run one replica (one daemon per data dir)".into());
    }
    let grace = pod.spec["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    let grace = std::time::Duration::from_secs(grace);
    problems.extend(grace_problem(
        "terminationGracePeriodSeconds",
        grace,
        config,
    ));
}

/// Services reach the API and metrics ports; the ServiceMonitor scrapes the metrics Service
/// under the job name the rules expect.
fn service_problems(
    tree: &Tree,
    objects: &Objects,
    pod: &Pod<'_>,
    config: &Config,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    let mut reached = BTreeMap::new();
    for service in objects.of_kind("Service") {
        if !selects(&service["spec"]["selector"], pod.labels()) {
            problems.push(format!(
                "Service {} selects no rebeld pod",
                service["metadata"]["name"]
            ));
        }
        for port in service["spec"]["ports"].as_array().into_iter().flatten() {
            let target = port.get("targetPort").unwrap_or(&port["port"]);
            match pod.resolve_port(target) {
                Some(number) => {
                    reached.insert(number, (service, port["name"].clone()));
                }
                None => problems.push(format!("Service port {port} reaches no container port")),
            }
        }
    }
    for (what, port) in [
        ("server", config.server.listen),
        ("metrics", config.metrics.listen),
    ] {
        if !reached.contains_key(&port.port()) {
            problems.push(format!("no Service reaches the {what} listener {port}"));
        }
    }

    let governing = pod.set["spec"]["serviceName"].as_str().unwrap_or_default();
    if objects.named("Service", governing)?["spec"]["clusterIP"] != "None" {
        problems.push(format!(
            "the StatefulSet's service {governing} is not headless"
        ));
    }
    let monitor = objects
        .of_kind("ServiceMonitor")
        .next()
        .ok_or("no ServiceMonitor")?;
    let Some((service, port_name)) = reached.get(&config.metrics.listen.port()) else {
        return Ok(());
    };
    let spec = &monitor["spec"];
    let endpoint_ok =
        spec["endpoints"].as_array().into_iter().flatten().any(|e| {
            e["port"] == *port_name && e.get("path").is_none_or(|path| path == "/metrics")
        });
    if !selects(
        &spec["selector"]["matchLabels"],
        &service["metadata"]["labels"],
    ) || !endpoint_ok
    {
        problems.push("the ServiceMonitor does not scrape the metrics Service's port".into());
    }
    let job = spec["jobLabel"]
        .as_str()
        .and_then(|label| service["metadata"]["labels"][label].as_str())
        .or_else(|| service["metadata"]["name"].as_str())
        .unwrap_or_default();
    let jobs = rules_jobs(tree)?;
    if !jobs.contains(job) {
        problems.push(format!(
            "the ServiceMonitor's job is {job}, the rules select {jobs:?}"
        ));
    }
    Ok(())
}
