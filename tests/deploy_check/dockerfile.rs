//! `deploy/docker/Dockerfile`: the runtime stage's ports, volume, health check, user and
//! command.

use std::collections::BTreeSet;
use std::path::Path;

use rebeld::config::Config;

use super::Tree;

/// Path of the Dockerfile.
pub const DOCKERFILE: &str = "deploy/docker/Dockerfile";

/// What the image declares (the last stage's instructions win, as in Docker).
#[derive(Debug, Default)]
pub struct Image {
    /// `EXPOSE` ports.
    pub exposed: BTreeSet<u16>,
    /// `VOLUME` paths.
    pub volumes: Vec<String>,
    /// The URL the `HEALTHCHECK` fetches.
    pub health_url: Option<String>,
    /// `CMD` in exec form.
    pub cmd: Vec<String>,
    /// `ENTRYPOINT` in exec form.
    pub entrypoint: Vec<String>,
    /// `USER`.
    pub user: Option<String>,
    /// The `--uid` given to `useradd`.
    pub uid: Option<u64>,
}

impl Image {
    /// Reads the Dockerfile of the tree.
    pub fn read(tree: &Tree) -> Result<Self, String> {
        let text = tree.text(Path::new(DOCKERFILE))?;
        let mut image = Self::default();
        for (instruction, rest) in instructions(text) {
            image.apply(&instruction, &rest)?;
        }
        Ok(image)
    }

    fn apply(&mut self, instruction: &str, rest: &str) -> Result<(), String> {
        let exec_form = || {
            serde_json::from_str::<Vec<String>>(rest)
                .map_err(|e| format!("{DOCKERFILE}: {instruction} {rest}: {e}"))
        };
        match instruction {
            "FROM" => *self = Self::default(),
            "EXPOSE" => {
                for port in rest.split_whitespace() {
                    let number = port.split('/').next().unwrap_or(port);
                    let number = number.parse().map_err(|_| format!("EXPOSE {port}"))?;
                    self.exposed.insert(number);
                }
            }
            "VOLUME" => self
                .volumes
                .extend(rest.split_whitespace().map(str::to_owned)),
            "HEALTHCHECK" => self.health_url = url_in(rest),
            "CMD" => self.cmd = exec_form()?,
            "ENTRYPOINT" => self.entrypoint = exec_form()?,
            "USER" => self.user = Some(rest.to_owned()),
            "RUN" => {
                if let Some(uid) = word_after(rest, "--uid") {
                    self.uid = Some(uid.parse().map_err(|_| format!("useradd --uid {uid}"))?);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Disagreements between the image and the configuration it runs with.
    pub fn problems(&self, config: &Config, origin: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let ports = BTreeSet::from([config.server.listen.port(), config.metrics.listen.port()]);
        if self.exposed != ports {
            problems.push(format!(
                "{DOCKERFILE} exposes {:?}, {origin} listens on {ports:?}",
                self.exposed
            ));
        }
        let data_dir = config.runtime.data_dir.to_string_lossy();
        if !self.volumes.iter().any(|volume| *volume == data_dir) {
            problems.push(format!(
                "{DOCKERFILE} declares volumes {:?}, {origin} keeps its data in {data_dir}",
                self.volumes
            ));
        }
        let runs_rebeld = self.entrypoint == ["rebeld"];
        if !runs_rebeld
            || self
                .user
                .as_deref()
                .is_none_or(|user| user == "root" || user == "0")
        {
            problems.push(format!(
                "{DOCKERFILE} must run rebeld as a non-root user: ENTRYPOINT {:?}, USER {:?}",
                self.entrypoint, self.user
            ));
        }
        let health = format!("http://127.0.0.1:{}/healthz", config.server.listen.port());
        if self.health_url.as_deref() != Some(health.as_str()) {
            problems.push(format!(
                "{DOCKERFILE} checks health at {:?}, expected {health} for {origin}",
                self.health_url
            ));
        }
        problems
    }
}

/// Instructions with their arguments, continuation lines joined and comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(trimmed);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    joined
        .iter()
        .filter_map(|line| {
            let (instruction, rest) = line.split_once(char::is_whitespace)?;
            Some((instruction.to_ascii_uppercase(), rest.trim().to_owned()))
        })
        .collect()
}

fn url_in(text: &str) -> Option<String> {
    let start = text.find("http://")?;
    let url = &text[start..];
    let end = url.find(['\'', '"', ' ', ')']).unwrap_or(url.len());
    Some(url[..end].to_owned())
}

fn word_after<'a>(text: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = text.split_whitespace();
    words.find(|word| *word == flag)?;
    words.next()
}

/// The image builds with the toolchain of `Cargo.toml`'s `rust-version` and the torch that
/// `scripts/setup` installs.
pub fn toolchain_problems(tree: &Tree) -> Vec<String> {
    super::collect(tree, |tree, problems| {
        let dockerfile = tree.text(Path::new(DOCKERFILE))?;
        let arg = |name: &str| {
            instructions(dockerfile)
                .into_iter()
                .filter(|(instruction, _)| instruction == "ARG")
                .find_map(|(_, rest)| Some(rest.strip_prefix(name)?.strip_prefix('=')?.to_owned()))
                .unwrap_or_default()
        };
        let wanted = [
            ("RUST_VERSION", "Cargo.toml", "rust-version = \""),
            ("TORCH_VERSION", "scripts/setup", "TORCH_VERSION="),
        ];
        for (name, file, key) in wanted {
            let text = tree.text(Path::new(file))?;
            let value = text
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .map(|rest| rest.trim_end_matches('"'))
                .ok_or_else(|| format!("{file} has no {key}"))?;
            let built = arg(name);
            if !(built == value || built.starts_with(&format!("{value}."))) {
                problems.push(format!(
                    "{DOCKERFILE} builds with {name}={built}, {file} says {value}"
                ));
            }
        }
        Ok(())
    })
}
