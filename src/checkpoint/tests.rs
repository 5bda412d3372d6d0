use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::*;

fn fields(passed: bool) -> ManifestFields {
    let checks = vec![GateCheck {
        name: "heldout_accuracy_drop".into(),
        passed,
        value: Some(if passed { 0.0 } else { 0.07 }),
        threshold: Some(0.02),
        detail: "held-out implicit-reward accuracy against the latest".into(),
    }];
    ManifestFields {
        parent: None,
        trainer_step: 10,
        objective: "rebel".into(),
        radius: 0.1,
        events_trained: 5,
        pairs_trained: 4,
        lineage: Lineage::default(),
        gates: GateReport { passed, checks },
    }
}

/// Commits a version holding `weights.bin` with `content`.
fn commit(store: &CheckpointStore, content: &[u8], passed: bool) -> Manifest {
    let draft = store.begin().expect("begin");
    std::fs::write(draft.dir().join("weights.bin"), content).expect("write");
    std::fs::write(draft.dir().join("config.json"), b"{}").expect("write");
    store.commit(draft, fields(passed)).expect("commit")
}

fn names(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .expect("list")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .into_string()
                .expect("utf-8")
        })
        .collect();
    names.sort();
    names
}

#[test]
fn version_folder_names_round_trip_and_nothing_else_parses() {
    assert_eq!(version_dir_name(42), "v00000042");
    assert_eq!(parse_version_dir("v00000042"), Some(42));
    assert_eq!(parse_version_dir("v123456789"), Some(123_456_789));
    for odd in [
        "v0000042",
        "v000000042",
        "v0000004a",
        "v-0000042",
        "V00000042",
        "00000042",
    ] {
        assert_eq!(parse_version_dir(odd), None, "{odd}");
    }
    assert_eq!(parse_version_dir(".draft-v00000042"), None);
}

#[test]
fn commit_records_every_file_with_its_hash_and_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CheckpointStore::open(dir.path(), 5).expect("open");
    let content = b"some weights".repeat(1000);
    let manifest = commit(&store, &content, true);

    assert_eq!(manifest.version, 1);
    let entry = &manifest.files["weights.bin"];
    assert_eq!(entry.size, content.len() as u64);
    assert_eq!(entry.sha256, hex::encode(Sha256::digest(&content)));
    assert_eq!(manifest.files.len(), 2);
    let on_disk = dir.path().join("v00000001");
    for file in ["weights.bin", "config.json", MANIFEST_FILE, MARKER_FILE] {
        assert!(on_disk.join(file).is_file(), "{file}");
    }
    let written: Manifest =
        serde_json::from_slice(&std::fs::read(on_disk.join(MANIFEST_FILE)).expect("read"))
            .expect("parse");
    assert_eq!(written, manifest);
    assert_eq!(store.latest(), None, "commit does not promote");
}

#[test]
fn promotion_is_persisted_and_announced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CheckpointStore::open(dir.path(), 5).expect("open");
    let mut latest = store.subscribe();
    commit(&store, b"one", true);
    commit(&store, b"two", true);
    store.promote(2).expect("promote");
    assert!(latest.has_changed().expect("sender alive"));
    assert_eq!(*latest.borrow_and_update(), Some(2));

    store.promote(1).expect("roll back");
    assert_eq!(*latest.borrow_and_update(), Some(1));
    drop(store);
    let reopened = CheckpointStore::open(dir.path(), 5).expect("reopen");
    assert_eq!(reopened.latest(), Some(1));
    assert_eq!(reopened.next_version(), 3);
}

#[test]
fn a_rejected_version_is_listed_with_reasons_and_cannot_be_promoted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CheckpointStore::open(dir.path(), 5).expect("open");
    commit(&store, b"good", true);
    store.promote(1).expect("promote");
    commit(&store, b"bad", false);

    let error = store.promote(2).expect_err("rejected");
    assert!(
        matches!(error, StoreError::Rejected { version: 2, .. }),
        "{error}"
    );
    assert!(matches!(
        store.promote(9),
        Err(StoreError::UnknownVersion(9))
    ));
    assert_eq!(store.latest(), Some(1));

    let list = store.list();
    assert_eq!(list[0].version, 2);
    assert_eq!(list[0].status, VersionStatus::Rejected);
    assert_eq!(list[0].reasons.len(), 1);
    assert!(
        list[0].reasons[0].starts_with("heldout_accuracy_drop: 0.07"),
        "{:?}",
        list[0]
    );
    assert_eq!(list[1].status, VersionStatus::Latest);
    assert!(list[1].reasons.is_empty());
}

#[test]
fn open_removes_partial_versions_and_keeps_latest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    {
        let store = CheckpointStore::open(root, 5).expect("open");
        commit(&store, b"one", true);
        store.promote(1).expect("promote");
        // A crash between the rename and the marker: manifest present, no marker.
        let v2 = commit(&store, b"two", true);
        std::fs::remove_file(root.join("v00000002").join(MARKER_FILE)).expect("unmark");
        assert_eq!(v2.version, 2);
        // A crash before the manifest: model files only.
        std::fs::create_dir(root.join("v00000009")).expect("mkdir");
        std::fs::write(root.join("v00000009/model.safetensors"), b"half").expect("write");
        // A crash while writing the draft.
        let draft = store.begin().expect("begin");
        std::fs::write(draft.dir().join("model.safetensors"), b"x").expect("write");
        std::mem::forget(draft);
        std::fs::write(root.join("latest.tmp"), b"{\"vers").expect("write");
    }
    let store = CheckpointStore::open(root, 5).expect("reopen");

    assert_eq!(names(root), ["latest", "v00000001"]);
    let listed: Vec<u64> = store.list().iter().map(|info| info.version).collect();
    assert_eq!(listed, [1]);
    assert_eq!(store.latest(), Some(1));
    assert_eq!(
        store.next_version(),
        10,
        "numbers seen on disk are never reused"
    );
}

#[test]
fn unexpected_entries_are_ignored_and_never_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join(MARKER_FILE), b"").expect("write");
    let root = dir.path();
    std::fs::create_dir_all(root).expect("mkdir");
    std::os::unix::fs::symlink(outside.path(), root.join("v00000007")).expect("symlink");
    std::fs::create_dir(root.join("v0000001%2e")).expect("mkdir");
    std::fs::write(root.join("notes.txt"), b"hello").expect("write");

    let store = CheckpointStore::open(root, 5).expect("open");
    assert!(store.list().is_empty());
    assert!(matches!(
        store.open_file(7, MARKER_FILE),
        Err(StoreError::UnknownVersion(7))
    ));
    assert!(
        outside.path().join(MARKER_FILE).exists(),
        "never deleted through a link"
    );
    assert_eq!(names(root), ["notes.txt", "v00000007", "v0000001%2e"]);
}

#[test]
fn open_file_serves_manifest_entries_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CheckpointStore::open(dir.path(), 5).expect("open");
    commit(&store, b"weights", true);

    let (entry, mut file, lease) = store.open_file(1, "weights.bin").expect("open");
    let mut content = Vec::new();
    file.read_to_end(&mut content).expect("read");
    assert_eq!(content, b"weights");
    assert_eq!(entry.size, 7);
    assert_eq!(lease.version(), 1);
    for name in [
        MANIFEST_FILE,
        MARKER_FILE,
        "../latest",
        "/etc/passwd",
        "missing",
        "",
    ] {
        assert!(
            matches!(
                store.open_file(1, name),
                Err(StoreError::UnknownFile { .. })
            ),
            "{name}"
        );
    }
}

#[test]
fn retention_keeps_the_newest_pinned_latest_and_leased_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CheckpointStore::open(dir.path(), 2).expect("open");
    for i in 1..=3_u8 {
        commit(&store, &[i], true);
    }
    // Versions 1..3, keep 2: version 1 went at the third commit.
    assert_eq!(names(dir.path()), ["v00000002", "v00000003"]);
    store.promote(2).expect("promote");
    store.pin(3).expect("pin");
    let (_, _, lease) = store.open_file(3, "weights.bin").expect("open");
    commit(&store, &[4], true);
    commit(&store, &[5], true);
    // Newest 4, 5; latest 2; pinned and leased 3.
    assert_eq!(
        names(dir.path()),
        [
            "latest",
            "pins.json",
            "v00000002",
            "v00000003",
            "v00000004",
            "v00000005"
        ]
    );
    store.unpin(3).expect("unpin");
    assert_eq!(
        store.prune().expect("prune"),
        Vec::<u64>::new(),
        "still leased"
    );
    drop(lease);
    assert_eq!(store.prune().expect("prune"), [3]);
    assert!(matches!(store.pin(3), Err(StoreError::UnknownVersion(3))));
}

#[test]
fn a_dropped_draft_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CheckpointStore::open(dir.path(), 2).expect("open");
    let draft = store.begin().expect("begin");
    std::fs::write(draft.dir().join("model.safetensors"), b"x").expect("write");
    drop(draft);
    assert!(names(dir.path()).is_empty());
    assert_eq!(store.begin().expect("begin").version(), 2);
}

#[test]
fn a_draft_with_a_subfolder_or_a_link_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CheckpointStore::open(dir.path(), 2).expect("open");
    let draft = store.begin().expect("begin");
    std::os::unix::fs::symlink("/etc/hostname", draft.dir().join("hostname")).expect("link");
    let error = store.commit(draft, fields(true)).expect_err("link");
    assert!(matches!(error, StoreError::BadDraft { .. }), "{error}");

    let draft = store.begin().expect("begin");
    std::fs::create_dir(draft.dir().join("sub")).expect("mkdir");
    assert!(store.commit(draft, fields(true)).is_err());
    assert!(names(dir.path()).is_empty(), "failed drafts are removed");
}
