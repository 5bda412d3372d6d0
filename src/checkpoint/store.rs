//! [`CheckpointStore`]: versions on disk, the latest pointer, pins, leases and retention.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::fsio::{hash_and_sync, io, read_json, replace_atomically, sync_dir, write_synced};
use super::{
    is_publishable_name, parse_version_dir, version_dir_name, FileEntry, Manifest, ManifestFields,
    StoreError, DRAFT_PREFIX, LATEST_FILE, MANIFEST_FILE, MARKER_FILE, PINS_FILE, TMP_SUFFIX,
    TRASH_PREFIX,
};

/// The versions on disk under one root folder. Cheap to clone; every clone is the same store.
///
/// Calls block on the file system: call them from a blocking thread inside async code.
#[derive(Clone)]
pub struct CheckpointStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    keep_versions: usize,
    state: Mutex<State>,
    latest_tx: watch::Sender<Option<u64>>,
}

#[derive(Default)]
struct State {
    versions: BTreeMap<u64, Arc<Manifest>>,
    next: u64,
    latest: Option<u64>,
    pins: BTreeSet<u64>,
    leases: BTreeMap<u64, usize>,
}

/// `latest` on disk.
#[derive(Serialize, Deserialize)]
struct LatestFile {
    version: u64,
}

/// `pins.json` on disk.
#[derive(Serialize, Deserialize)]
struct PinsFile {
    pinned: Vec<u64>,
}

/// Where a version stands.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VersionStatus {
    /// The version clients pull now.
    Latest,
    /// Passed its gates; can be promoted (again).
    Published,
    /// Failed its gates; can never become latest.
    Rejected,
}

/// One row of [`CheckpointStore::list`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionInfo {
    /// The version.
    pub version: u64,
    /// Latest, published or rejected.
    pub status: VersionStatus,
    /// Kept regardless of retention.
    pub pinned: bool,
    /// When it was committed, RFC 3339 UTC.
    pub created_at: String,
    /// Why it was rejected (empty otherwise).
    pub reasons: Vec<String>,
}

/// A version being written: put the model files in [`Draft::dir`], then
/// [`CheckpointStore::commit`] it. Dropping it uncommitted removes the folder.
#[derive(Debug)]
pub struct Draft {
    version: u64,
    dir: PathBuf,
    committed: bool,
}

impl Draft {
    /// The version number reserved for it.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The folder to write the model files into (flat: no subfolders).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Draft {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => info!(version = self.version, "draft discarded"),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => warn!(
                version = self.version,
                dir = %self.dir.display(),
                %error,
                "cannot remove a discarded draft"
            ),
        }
    }
}

/// Held while a version's file is being read: retention keeps the version meanwhile.
pub struct DownloadLease {
    inner: Arc<Inner>,
    version: u64,
}

impl DownloadLease {
    /// The version held.
    pub fn version(&self) -> u64 {
        self.version
    }
}

impl Drop for DownloadLease {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        if let Some(count) = state.leases.get_mut(&self.version) {
            *count -= 1;
            if *count == 0 {
                state.leases.remove(&self.version);
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn version_dir(&self, version: u64) -> PathBuf {
        self.root.join(version_dir_name(version))
    }
}

/// What [`scan`] found under the root.
struct Scan {
    versions: BTreeMap<u64, Arc<Manifest>>,
    highest_seen: u64,
}

impl CheckpointStore {
    /// Opens (creating if needed) the store under `root`, removing drafts and versions that
    /// never got their completion marker. `keep_versions` is the retention (at least 1).
    pub fn open(root: &Path, keep_versions: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root).map_err(io("create", root))?;
        let scan = scan(root)?;
        let latest = read_latest(root, &scan.versions)?;
        let pins = read_pins(root, &scan.versions)?;
        let highest = [scan.highest_seen, latest.unwrap_or(0)]
            .into_iter()
            .chain(pins.iter().copied())
            .max()
            .unwrap_or(0);
        info!(
            root = %root.display(),
            versions = scan.versions.len(),
            latest = ?latest,
            "checkpoint store opened"
        );
        let state = State {
            versions: scan.versions,
            next: highest + 1,
            latest,
            pins,
            leases: BTreeMap::new(),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                keep_versions: keep_versions.max(1),
                state: Mutex::new(state),
                latest_tx: watch::Sender::new(latest),
            }),
        })
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The number the next draft gets: one more than any version ever seen on disk.
    pub fn next_version(&self) -> u64 {
        self.inner.lock().next
    }

    /// Reserves the next version number and creates its draft folder.
    pub fn begin(&self) -> Result<Draft, StoreError> {
        let version = {
            let mut state = self.inner.lock();
            state.next += 1;
            state.next - 1
        };
        let dir = self
            .inner
            .root
            .join(format!("{DRAFT_PREFIX}{}", version_dir_name(version)));
        std::fs::create_dir(&dir).map_err(io("create draft", &dir))?;
        Ok(Draft {
            version,
            dir,
            committed: false,
        })
    }

    /// Hashes the draft's files, writes its manifest, moves it into place and writes the
    /// completion marker, each step flushed to disk. The version is not promoted; retention
    /// runs afterwards.
    pub fn commit(&self, mut draft: Draft, fields: ManifestFields) -> Result<Manifest, StoreError> {
        let files = hash_draft(&draft.dir)?;
        let created_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        let manifest = Manifest::assemble(draft.version, created_at.to_string(), files, fields);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|source| StoreError::Parse {
            path: draft.dir.join(MANIFEST_FILE),
            source,
        })?;
        write_synced(&draft.dir.join(MANIFEST_FILE), &json)?;
        sync_dir(&draft.dir)?;

        let target = self.inner.version_dir(draft.version);
        std::fs::rename(&draft.dir, &target).map_err(io("rename draft", &draft.dir))?;
        draft.committed = true;
        sync_dir(&self.inner.root)?;
        crate::failpoint::hit("checkpoint.before_marker");
        write_synced(&target.join(MARKER_FILE), b"")?;
        sync_dir(&target)?;

        self.inner
            .lock()
            .versions
            .insert(draft.version, Arc::new(manifest.clone()));
        info!(
            version = manifest.version,
            files = manifest.files.len(),
            gates_passed = manifest.gates.passed,
            "version committed"
        );
        if let Err(error) = self.prune() {
            warn!(%error, "retention failed after a commit");
        }
        Ok(manifest)
    }

    /// Makes `version` the latest (a newer one, or an older one to roll back). A rejected
    /// or unknown version is refused.
    pub fn promote(&self, version: u64) -> Result<(), StoreError> {
        let mut state = self.inner.lock();
        let manifest = state
            .versions
            .get(&version)
            .ok_or(StoreError::UnknownVersion(version))?;
        if !manifest.gates.passed {
            return Err(StoreError::Rejected {
                version,
                reasons: manifest.gates.reasons(),
            });
        }
        let json = serde_json::json!(LatestFile { version }).to_string();
        replace_atomically(&self.inner.root, LATEST_FILE, json.as_bytes())?;
        let previous = state.latest.replace(version);
        self.inner.latest_tx.send_replace(Some(version));
        info!(version, previous = ?previous, "version promoted to latest");
        Ok(())
    }

    /// Keeps `version` regardless of retention.
    pub fn pin(&self, version: u64) -> Result<(), StoreError> {
        let mut state = self.inner.lock();
        if !state.versions.contains_key(&version) {
            return Err(StoreError::UnknownVersion(version));
        }
        if state.pins.insert(version) {
            self.write_pins(&state)?;
            info!(version, "version pinned");
        }
        Ok(())
    }

    /// Returns `version` to normal retention (pruned at the next commit if old enough).
    pub fn unpin(&self, version: u64) -> Result<(), StoreError> {
        let mut state = self.inner.lock();
        if !state.versions.contains_key(&version) && !state.pins.contains(&version) {
            return Err(StoreError::UnknownVersion(version));
        }
        if state.pins.remove(&version) {
            self.write_pins(&state)?;
            info!(version, "version unpinned");
        }
        Ok(())
    }

    fn write_pins(&self, state: &State) -> Result<(), StoreError> {
        let pinned = state.pins.iter().copied().collect();
        let json = serde_json::json!(PinsFile { pinned }).to_string();
        replace_atomically(&self.inner.root, PINS_FILE, json.as_bytes())
    }

    /// The version clients pull now.
    pub fn latest(&self) -> Option<u64> {
        self.inner.lock().latest
    }

    /// A committed version's manifest.
    pub fn manifest(&self, version: u64) -> Result<Manifest, StoreError> {
        let state = self.inner.lock();
        let manifest = state
            .versions
            .get(&version)
            .ok_or(StoreError::UnknownVersion(version))?;
        Ok(Manifest::clone(manifest))
    }

    /// Every committed version, newest first.
    pub fn list(&self) -> Vec<VersionInfo> {
        let state = self.inner.lock();
        state
            .versions
            .iter()
            .rev()
            .map(|(&version, manifest)| {
                let status = if state.latest == Some(version) {
                    VersionStatus::Latest
                } else if manifest.gates.passed {
                    VersionStatus::Published
                } else {
                    VersionStatus::Rejected
                };
                let reasons = if manifest.gates.passed {
                    Vec::new()
                } else {
                    manifest.gates.reasons()
                };
                VersionInfo {
                    version,
                    status,
                    pinned: state.pins.contains(&version),
                    created_at: manifest.created_at.clone(),
                    reasons,
                }
            })
            .collect()
    }

    /// Watches the latest version: every promotion (and rollback) is seen.
    pub fn subscribe(&self) -> watch::Receiver<Option<u64>> {
        self.inner.latest_tx.subscribe()
    }

    /// Opens one file of a committed version for reading. `name` is only looked up among
    /// the manifest's entries; the path opened is built from the manifest's own key. The
    /// lease keeps the version on disk until dropped.
    pub fn open_file(
        &self,
        version: u64,
        name: &str,
    ) -> Result<(FileEntry, File, DownloadLease), StoreError> {
        let mut state = self.inner.lock();
        let manifest = state
            .versions
            .get(&version)
            .ok_or(StoreError::UnknownVersion(version))?;
        let unknown = || StoreError::UnknownFile {
            version,
            name: name.to_owned(),
        };
        let (key, entry) = manifest.files.get_key_value(name).ok_or_else(unknown)?;
        if !is_publishable_name(key) {
            return Err(unknown());
        }
        let entry = entry.clone();
        let path = self.inner.version_dir(version).join(key);
        let file = open_regular(&path, entry.size)?;
        *state.leases.entry(version).or_default() += 1;
        let lease = DownloadLease {
            inner: self.inner.clone(),
            version,
        };
        Ok((entry, file, lease))
    }

    /// Retention: removes every version that is not among the newest `keep_versions`, not
    /// pinned, not latest and not being downloaded. Returns the versions removed.
    pub fn prune(&self) -> Result<Vec<u64>, StoreError> {
        let mut trash = Vec::new();
        let mut removed = Vec::new();
        {
            let mut state = self.inner.lock();
            let keep = kept_versions(&state, self.inner.keep_versions);
            let victims: Vec<u64> = state
                .versions
                .keys()
                .copied()
                .filter(|version| !keep.contains(version))
                .collect();
            for version in victims {
                let from = self.inner.version_dir(version);
                let to = self
                    .inner
                    .root
                    .join(format!("{TRASH_PREFIX}{}", version_dir_name(version)));
                std::fs::rename(&from, &to).map_err(io("rename for removal", &from))?;
                state.versions.remove(&version);
                trash.push(to);
                removed.push(version);
            }
        }
        for (dir, version) in trash.iter().zip(&removed) {
            std::fs::remove_dir_all(dir).map_err(io("remove", dir))?;
            info!(version, "version removed by retention");
        }
        if !removed.is_empty() {
            sync_dir(&self.inner.root)?;
        }
        Ok(removed)
    }
}

/// Versions retention must keep.
fn kept_versions(state: &State, keep_versions: usize) -> BTreeSet<u64> {
    let newest = state.versions.keys().rev().take(keep_versions).copied();
    newest
        .chain(state.pins.iter().copied())
        .chain(state.latest)
        .chain(state.leases.keys().copied())
        .collect()
}

/// Opens a regular file (never through a symlink) whose size must match the manifest.
fn open_regular(path: &Path, expected: u64) -> Result<File, StoreError> {
    let meta = std::fs::symlink_metadata(path).map_err(io("inspect", path))?;
    if !meta.file_type().is_file() {
        return Err(StoreError::BadDraft {
            path: path.to_owned(),
            reason: "not a regular file",
        });
    }
    let file = File::open(path).map_err(io("open", path))?;
    let actual = file.metadata().map_err(io("inspect", path))?.len();
    if actual != expected {
        return Err(StoreError::SizeMismatch {
            path: path.to_owned(),
            expected,
            actual,
        });
    }
    Ok(file)
}

/// Size and hash of every file of a draft, which must be flat and hold only publishable
/// names.
fn hash_draft(dir: &Path) -> Result<BTreeMap<String, FileEntry>, StoreError> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let entry = entry.map_err(io("list", dir))?;
        let path = entry.path();
        let bad = |reason| StoreError::BadDraft {
            path: path.clone(),
            reason,
        };
        let kind = entry.file_type().map_err(io("inspect", &path))?;
        if !kind.is_file() {
            return Err(bad(
                "only regular files can be published (no folders, no links)",
            ));
        }
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| bad("the name is not UTF-8"))?;
        if !is_publishable_name(&name) {
            return Err(bad(
                "names are letters, digits, '-', '_' and '.', not hidden",
            ));
        }
        let hashed = hash_and_sync(&path)?;
        files.insert(name, hashed);
    }
    Ok(files)
}

/// Loads the committed versions and removes unfinished ones.
fn scan(root: &Path) -> Result<Scan, StoreError> {
    let mut scan = Scan {
        versions: BTreeMap::new(),
        highest_seen: 0,
    };
    for entry in std::fs::read_dir(root).map_err(io("list", root))? {
        let entry = entry.map_err(io("list", root))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io("inspect", &path))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if kind.is_dir() {
            scan_folder(&mut scan, &path, &name)?;
        } else if kind.is_file() && is_own_temporary(&name) {
            std::fs::remove_file(&path).map_err(io("remove", &path))?;
            info!(file = %path.display(), "removed an unfinished temporary file");
        }
    }
    Ok(scan)
}

fn is_own_temporary(name: &str) -> bool {
    [LATEST_FILE, PINS_FILE]
        .iter()
        .any(|file| name.strip_suffix(TMP_SUFFIX) == Some(file))
}

/// One real folder of the root: a draft, trash, a version, or something ignored.
fn scan_folder(scan: &mut Scan, path: &Path, name: &str) -> Result<(), StoreError> {
    let leftover = name
        .strip_prefix(DRAFT_PREFIX)
        .or_else(|| name.strip_prefix(TRASH_PREFIX));
    if let Some(version_name) = leftover {
        if let Some(version) = parse_version_dir(version_name) {
            scan.highest_seen = scan.highest_seen.max(version);
        }
        std::fs::remove_dir_all(path).map_err(io("remove", path))?;
        info!(folder = %path.display(), "removed an unfinished draft or removal");
        return Ok(());
    }
    let Some(version) = parse_version_dir(name) else {
        return Ok(());
    };
    scan.highest_seen = scan.highest_seen.max(version);
    let marker = std::fs::symlink_metadata(path.join(MARKER_FILE));
    if !marker.is_ok_and(|meta| meta.file_type().is_file()) {
        std::fs::remove_dir_all(path).map_err(io("remove", path))?;
        warn!(
            folder = %path.display(),
            "removed a version folder without its completion marker"
        );
        return Ok(());
    }
    match load_manifest(path, version) {
        Ok(manifest) => {
            scan.versions.insert(version, Arc::new(manifest));
        }
        Err(error) => warn!(version, %error, "version skipped: its manifest is unusable"),
    }
    Ok(())
}

fn load_manifest(dir: &Path, version: u64) -> Result<Manifest, StoreError> {
    let path = dir.join(MANIFEST_FILE);
    let manifest: Manifest = read_json(&path)?.ok_or_else(|| StoreError::Io {
        action: "read",
        path: path.clone(),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let names_ok = manifest.files.keys().all(|name| is_publishable_name(name));
    if manifest.version != version || !names_ok {
        return Err(StoreError::BadDraft {
            path,
            reason: "the manifest names another version or an unservable file",
        });
    }
    Ok(manifest)
}

fn read_latest(
    root: &Path,
    versions: &BTreeMap<u64, Arc<Manifest>>,
) -> Result<Option<u64>, StoreError> {
    let Some(LatestFile { version }) = read_json(&root.join(LATEST_FILE))? else {
        return Ok(None);
    };
    if versions.get(&version).is_some_and(|m| m.gates.passed) {
        return Ok(Some(version));
    }
    warn!(
        version,
        "latest names a version that is missing or rejected; none is latest"
    );
    Ok(None)
}

fn read_pins(
    root: &Path,
    versions: &BTreeMap<u64, Arc<Manifest>>,
) -> Result<BTreeSet<u64>, StoreError> {
    let pins: Option<PinsFile> = read_json(&root.join(PINS_FILE))?;
    Ok(pins
        .map(|file| file.pinned)
        .unwrap_or_default()
        .into_iter()
        .filter(|version| versions.contains_key(version))
        .collect())
}
