//! Checks that the deployment files under `deploy/` agree with each other and with the code:
//! listener ports, probe paths, data volumes, the configurations they mount, Prometheus and
//! Grafana wiring, and metric names. Each checker reads a [`Tree`] of file texts and returns
//! the problems it found, so a test can also run it on a deliberately broken copy.
#![allow(unreachable_pub)]

mod compose;
mod dockerfile;
mod k8s;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use rebeld::config::Config;
use rebeld::metrics::CATALOGUE;
use serde::Deserialize;
use serde_json::Value;

pub use compose::{compose_host_file, compose_problems, interpolate};
pub use dockerfile::toolchain_problems;
pub use k8s::k8s_problems;

/// Time a resume-state write may take after `runtime.shutdown_timeout`: every orchestrator's
/// grace period must leave at least this much.
pub const RESUME_WRITE_ALLOWANCE: Duration = Duration::from_secs(30);

/// The folders and files the checks read, relative to the repository root.
const READ: [&str; 5] = [
    "deploy",
    "dashboards",
    "config",
    "Cargo.toml",
    "scripts/setup",
];

/// Series suffixes Prometheus adds to histograms.
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// The texts of every file of [`READ`], by path relative to the repository root.
#[derive(Clone)]
pub struct Tree {
    files: BTreeMap<PathBuf, String>,
}

impl Tree {
    /// Reads the repository's files.
    pub fn load() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = BTreeMap::new();
        for name in READ {
            read_folder(root, &root.join(name), &mut files);
        }
        Self { files }
    }

    /// The text of one file.
    pub fn text(&self, path: &Path) -> Result<&str, String> {
        self.files
            .get(&normalize(path))
            .map(String::as_str)
            .ok_or_else(|| format!("{} does not exist", path.display()))
    }

    /// Files directly or indirectly under `folder`.
    pub fn under<'a>(&'a self, folder: &'a Path) -> impl Iterator<Item = (&'a Path, &'a str)> {
        let folder = normalize(folder);
        self.files
            .iter()
            .filter(move |(path, _)| path.starts_with(&folder))
            .map(|(path, text)| (path.as_path(), text.as_str()))
    }

    /// A copy with the one occurrence of `from` in `path` replaced by `to`; panics unless
    /// `from` occurs exactly once, so an edit never silently misses.
    pub fn with_edit(&self, path: &str, from: &str, to: &str) -> Self {
        let text = self.text(Path::new(path)).expect("edited file");
        assert_eq!(text.matches(from).count(), 1, "{from:?} in {path}");
        let mut edited = self.clone();
        edited
            .files
            .insert(PathBuf::from(path), text.replacen(from, to, 1));
        edited
    }

    /// The YAML documents of a file, as JSON values.
    pub fn yaml(&self, path: &Path) -> Result<Vec<Value>, String> {
        yaml_documents(self.text(path)?).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Reads a file, or every file below a folder.
fn read_folder(root: &Path, path: &Path, files: &mut BTreeMap<PathBuf, String>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("folder").flatten() {
            read_folder(root, &entry.path(), files);
        }
    } else if let Ok(text) = std::fs::read_to_string(path) {
        let relative = path.strip_prefix(root).expect("under the root");
        files.insert(relative.to_owned(), text);
    }
}

/// Every YAML document of `text`.
pub fn yaml_documents(text: &str) -> Result<Vec<Value>, serde_yaml_ng::Error> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(Value::deserialize)
        .filter(|doc| !matches!(doc, Ok(Value::Null)))
        .collect()
}

/// `a/b/../c` as `a/c`, without touching the file system.
pub fn normalize(path: &Path) -> PathBuf {
    let mut parts: Vec<Component<'_>> = Vec::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir if matches!(parts.last(), Some(Component::Normal(_))) => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.iter().collect()
}

/// Where a container path lies on the other side of a mount: the longest mount target that
/// contains `path`, and the rest of the path below it.
pub fn through_mounts<'a>(mounts: &'a [(String, String)], path: &str) -> Option<(&'a str, String)> {
    mounts
        .iter()
        .filter_map(|(source, target)| {
            let rest = Path::new(path).strip_prefix(target).ok()?;
            Some((
                target.len(),
                source.as_str(),
                rest.to_string_lossy().into_owned(),
            ))
        })
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, source, rest)| (source, rest))
}

/// The value after `flag` in an argument list, as `--flag value` or `--flag=value`.
pub fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            arg.strip_prefix(&prefix)
        }
    })
}

/// Strings of a JSON array (or a lone string as one element).
pub fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(text) => vec![text.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|item| match item {
                Value::String(text) => Some(text.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Runs a check that reports mismatches as it goes and stops at the first missing piece;
/// answers every problem, the stopping one last.
fn collect(tree: &Tree, check: fn(&Tree, &mut Vec<String>) -> Result<(), String>) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(fatal) = check(tree, &mut problems) {
        problems.push(fatal);
    }
    problems
}

/// Loads a configuration text as the daemon would, with `env` as its environment.
pub fn load_config(
    origin: &str,
    text: &str,
    env: &BTreeMap<String, String>,
) -> Result<Config, String> {
    let env = env.iter().map(|(k, v)| (k.clone(), v.clone()));
    Config::from_toml(origin, text, env).map_err(|e| format!("{origin} is refused: {e}"))
}

/// Grace periods must exceed the shutdown deadline by [`RESUME_WRITE_ALLOWANCE`].
pub fn grace_problem(what: &str, grace: Duration, config: &Config) -> Option<String> {
    let needed = config.runtime.shutdown_timeout + RESUME_WRITE_ALLOWANCE;
    (grace < needed).then(|| {
        format!(
            "{what} is {grace:?}, under runtime.shutdown_timeout plus a resume-state write \
             ({needed:?})"
        )
    })
}

/// The `job="…"` values the Prometheus rules select.
pub fn rules_jobs(tree: &Tree) -> Result<BTreeSet<String>, String> {
    let rules = tree.text(Path::new("deploy/prometheus/rules.yml"))?;
    Ok(rules
        .split("job=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect())
}

/// Every `rebeld_*` or `process_*` word of a text, histogram suffixes stripped.
pub fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("rebeld_") || word.starts_with("process_"))
        .map(|word| {
            HISTOGRAM_SUFFIXES
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix))
                .unwrap_or(word)
                .to_owned()
        })
        .collect()
}

/// Metric names under `deploy/` that the catalogue does not define.
pub fn metric_problems(tree: &Tree) -> Vec<String> {
    let catalogued: BTreeSet<&str> = CATALOGUE.iter().map(|spec| spec.name).collect();
    let mut problems = Vec::new();
    for (path, text) in tree.under(Path::new("deploy")) {
        for name in metric_names(text) {
            if !catalogued.contains(name.as_str()) && !name.starts_with("process_") {
                problems.push(format!(
                    "{} names {name}, not in the catalogue",
                    path.display()
                ));
            }
        }
    }
    problems
}

/// YAML files under `deploy/` that do not parse, and JSON files under `deploy/` or
/// `dashboards/` that do not; with the number of files read.
pub fn parse_problems(tree: &Tree) -> (usize, Vec<String>) {
    let mut read = 0;
    let mut problems = Vec::new();
    for folder in ["deploy", "dashboards"] {
        for (path, text) in tree.under(Path::new(folder)) {
            let problem = match path.extension().and_then(|e| e.to_str()) {
                Some("yaml" | "yml") if folder == "deploy" => {
                    yaml_documents(text).err().map(|e| e.to_string())
                }
                Some("json") => serde_json::from_str::<Value>(text)
                    .err()
                    .map(|e| e.to_string()),
                _ => continue,
            };
            read += 1;
            problems.extend(problem.map(|e| format!("{}: {e}", path.display())));
        }
    }
    (read, problems)
}

/// `deploy/systemd/rebeld.service` against `config/production.toml`, the file it is meant to
/// run with (tokens come from its environment file): the stop timeout leaves time for the
/// resume state, and the data dir is writable.
pub fn systemd_problems(tree: &Tree) -> Vec<String> {
    collect(tree, |tree, problems| {
        let unit = tree.text(Path::new("deploy/systemd/rebeld.service"))?;
        let production = tree.text(Path::new("config/production.toml"))?;
        let env_file = [("REBELD__SERVER__READ_TOKENS", "[\"token\"]")]
            .map(|(name, value)| (name.to_owned(), value.to_owned()));
        let config = load_config("config/production.toml", production, &env_file.into())?;
        let setting = |key: &str| {
            unit.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_default()
        };
        let stop = setting("TimeoutStopSec");
        let seconds = stop.parse().map_err(|_| format!("TimeoutStopSec={stop}"))?;
        let grace = Duration::from_secs(seconds);
        problems.extend(grace_problem("TimeoutStopSec", grace, &config));
        let data_dir = config.runtime.data_dir.to_string_lossy();
        if !setting("ReadWritePaths")
            .split_whitespace()
            .any(|p| p == data_dir)
        {
            problems.push(format!("ReadWritePaths does not hold {data_dir}"));
        }
        Ok(())
    })
}
