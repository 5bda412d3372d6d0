//! Durable file-system steps: fsync of files and folders, atomic replacement, hashing.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{FileEntry, StoreError, TMP_SUFFIX};

/// Wraps an I/O error with what was being done and to which path.
pub(super) fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// Flushes a folder's entries (creations, renames, removals) to disk.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(io("fsync folder", dir))
}

/// Writes `bytes` to a new file and flushes it to disk.
pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut file = File::create(path).map_err(io("create", path))?;
    file.write_all(bytes).map_err(io("write", path))?;
    file.sync_all().map_err(io("fsync", path))
}

/// Replaces `dir/name` with `bytes`: temporary file, fsync, rename, fsync of the folder.
pub(super) fn replace_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let path = dir.join(name);
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
    sync_dir(dir)
}

/// Size and SHA-256 of a file, read in chunks; the file is flushed to disk as well.
pub(super) fn hash_and_sync(path: &Path) -> Result<FileEntry, StoreError> {
    let file = File::open(path).map_err(io("open", path))?;
    file.sync_all().map_err(io("fsync", path))?;
    hash_reader(file).map_err(io("read", path))
}

/// Size and SHA-256 of everything `reader` yields, read in 1 MiB chunks.
pub(crate) fn hash_reader(mut reader: impl Read) -> std::io::Result<FileEntry> {
    let mut hasher = Sha256::new();
    let mut chunk = vec![0_u8; 1 << 20];
    let mut size = 0_u64;
    loop {
        let read = reader.read(&mut chunk)?;
        if read == 0 {
            break;
        }
        hasher.update(&chunk[..read]);
        size += read as u64;
    }
    Ok(FileEntry {
        sha256: hex::encode(hasher.finalize()),
        size,
    })
}

/// Reads and parses a small JSON file; `None` when it does not exist.
pub(super) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io("read", path)(error)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StoreError::Parse {
            path: path.to_owned(),
            source,
        })
}
