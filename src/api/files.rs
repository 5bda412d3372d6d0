//! `GET /v1/versions/{v}/files/{name}`: one file, streamed, with `ETag` and byte ranges.

use std::fs::File;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::{stream, StreamExt};
use memmap2::{Advice, MmapOptions};

use super::auth::Scope;
use super::versions::{parse_version, InFlight};
use super::{ApiError, Serving};

/// Chunk size of a streamed body: a slice of the mapped file whose pages are faulted in on
/// the blocking pool before hyper gets it (one hop per chunk), so a file that is not in the
/// page cache is read there and not on a runtime worker inside a socket write.
const CHUNK: usize = 2 * 1024 * 1024;
/// Bytes between the reads that fault a chunk's pages in: the smallest page size.
const PAGE: usize = 4096;
/// Versions never change, so a file can be cached for good.
const CACHE_CONTROL: &str = "public, max-age=31536000, immutable";

/// Which bytes a request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ranged {
    /// The whole file (no `Range`, several ranges, or a `Range` we do not read).
    Full,
    /// Bytes `start..=end`.
    Part {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: u64,
    },
    /// A well-formed range that lies outside the file.
    Unsatisfiable,
}

/// Reads a single `bytes=` range (`a-b`, `a-`, `-n`) against a file of `size` bytes.
pub(super) fn parse_range(value: &str, size: u64) -> Ranged {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ranged::Full;
    };
    if spec.contains(',') {
        return Ranged::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ranged::Full;
    };
    let number = |text: &str| {
        let valid = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
        valid.then(|| text.parse::<u64>().ok()).flatten()
    };
    match (first, last) {
        ("", suffix) => match number(suffix) {
            Some(0) => Ranged::Unsatisfiable,
            Some(_) if size == 0 => Ranged::Unsatisfiable,
            Some(n) => Ranged::Part {
                start: size.saturating_sub(n),
                end: size - 1,
            },
            None => Ranged::Full,
        },
        (first, last) => match (number(first), number(last)) {
            (Some(start), _) if start >= size => Ranged::Unsatisfiable,
            (Some(start), None) if last.is_empty() => Ranged::Part {
                start,
                end: size - 1,
            },
            (Some(start), Some(end)) if end >= start => Ranged::Part {
                start,
                end: end.min(size - 1),
            },
            _ => Ranged::Full,
        },
    }
}

/// True when `If-None-Match` names `etag` (or is `*`).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == etag || tag == "*")
}

/// The range to serve: `If-Range` with another validator means the whole file.
fn requested_range(headers: &HeaderMap, etag: &str, size: u64) -> Ranged {
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ranged::Full;
    };
    let if_range = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok());
    if if_range.is_some_and(|tag| tag.trim() != etag) {
        return Ranged::Full;
    }
    parse_range(range, size)
}

/// Serves one file of a committed version.
pub(super) async fn download(
    State(state): State<Arc<Serving>>,
    headers: HeaderMap,
    Path((version, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    state.auth.check(&headers, Scope::Read)?;
    let version = parse_version(&version)?;
    let Ok(permit) = state.downloads.clone().try_acquire_owned() else {
        state.metrics.serve.refused.inc();
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many downloads in progress (server.max_concurrent_downloads)",
        )
        .with_header(header::RETRY_AFTER, "1"));
    };
    let (entry, file, lease) = state
        .blocking(move |store| store.open_file(version, &name))
        .await?;
    let etag = format!("\"{}\"", entry.sha256);
    let builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::CACHE_CONTROL, CACHE_CONTROL)
        .header(header::ACCEPT_RANGES, "bytes");
    if not_modified(&headers, &etag) {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .map_err(|error| ApiError::internal(&error));
    }
    let (status, start, length, builder) = match requested_range(&headers, &etag, entry.size) {
        Ranged::Full => (StatusCode::OK, 0, entry.size, builder),
        Ranged::Part { start, end } => {
            let range = format!("bytes {start}-{end}/{}", entry.size);
            let builder = builder.header(header::CONTENT_RANGE, range);
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1, builder)
        }
        Ranged::Unsatisfiable => {
            let range = format!("bytes */{}", entry.size);
            return Err(ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("the file has {} bytes", entry.size),
            )
            .with_content_range(range));
        }
    };
    let body = map_range(&file, start, length).map_err(|error| ApiError::internal(&error))?;
    let in_flight = InFlight::new(&state.metrics.serve.downloads_in_flight);
    let bytes = state.metrics.serve.bytes.clone();
    let guards = (lease, permit, in_flight);
    let chunks = (0..body.len()).step_by(CHUNK);
    let chunks = chunks.map(move |at| body.slice(at..body.len().min(at + CHUNK)));
    let stream = stream::iter(chunks)
        .then(|chunk| async move {
            tokio::task::spawn_blocking(move || fault_in(chunk))
                .await
                .map_err(std::io::Error::other)
        })
        .map(move |chunk| {
            let _held = &guards;
            if let Ok(chunk) = &chunk {
                bytes.inc_by(chunk.len() as u64);
            }
            chunk
        })
        .take_until(state.shutdown.clone().cancelled_owned());
    builder
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, length)
        .body(Body::from_stream(stream))
        .map_err(|error| ApiError::internal(&error))
}

/// Bytes `start..start + length` of the file, mapped into memory rather than read: hyper
/// hands the slices to the socket, so no byte is copied in user space.
///
/// Sound because a committed file is never truncated or rewritten in place: a new version is
/// a new folder, and removing a file leaves an existing mapping readable. `open_file`
/// checked the size. Truncation from outside rebeld, or a disk read error on a mapped page,
/// raises `SIGBUS` and ends the process, where a read would have failed one download
/// (README, HTTP API).
fn map_range(file: &File, start: u64, length: u64) -> std::io::Result<Bytes> {
    if length == 0 {
        return Ok(Bytes::new());
    }
    let length = usize::try_from(length).map_err(std::io::Error::other)?;

    // SAFETY: see above; the file is never truncated or rewritten while mapped.
    let map = unsafe { MmapOptions::new().offset(start).len(length).map(file)? };
    // Only a hint for the kernel's read-ahead: serving works without it.
    let _ = map.advise(Advice::Sequential);
    Ok(Bytes::from_owner(map))
}

/// Reads one byte of every page of `chunk`, so the kernel brings the pages into memory now
/// (from disk if need be) and the socket write that follows finds them resident.
fn fault_in(chunk: Bytes) -> Bytes {
    let touched = chunk
        .iter()
        .step_by(PAGE)
        .fold(0_u8, |acc, &byte| acc ^ byte);
    std::hint::black_box(touched);
    chunk
}

impl ApiError {
    fn with_content_range(mut self, value: String) -> Self {
        if let Ok(value) = HeaderValue::from_str(&value) {
            self.headers.push((header::CONTENT_RANGE, value));
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_ranges_are_read_against_the_size() {
        let part = |start, end| Ranged::Part { start, end };
        assert_eq!(parse_range("bytes=0-9", 100), part(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), part(90, 99));
        assert_eq!(parse_range("bytes=90-500", 100), part(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), part(90, 99));
        assert_eq!(parse_range("bytes=-500", 100), part(0, 99));
        assert_eq!(parse_range("bytes=100-", 100), Ranged::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Ranged::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Ranged::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), Ranged::Full);
        assert_eq!(parse_range("bytes=0-1,5-9", 100), Ranged::Full);
        assert_eq!(parse_range("items=0-1", 100), Ranged::Full);
        assert_eq!(parse_range("bytes=+1-2", 100), Ranged::Full);
    }

    #[test]
    fn if_none_match_takes_lists_weak_tags_and_star() {
        let etag = "\"abc\"";
        let check = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::IF_NONE_MATCH, value.parse().expect("header"));
            not_modified(&headers, etag)
        };
        assert!(check("\"abc\""));
        assert!(check("\"x\", W/\"abc\""));
        assert!(check("*"));
        assert!(!check("\"abd\""));
    }

    #[test]
    fn mapped_ranges_hold_the_files_bytes_at_any_offset() {
        use std::io::Write;

        let page = 4096;
        let content: Vec<u8> = (0..3 * page + 123).map(|i| (i * 7 % 251) as u8).collect();
        let mut file = tempfile::tempfile().expect("temporary file");
        file.write_all(&content).expect("write");

        let size = content.len();
        let ranges = [
            (0, size),
            (1, size - 1),
            (page - 1, 2),
            (page, page),
            (page + 17, 2 * page),
            (size - 1, 1),
            (size, 0),
            (5, 0),
        ];
        for (start, length) in ranges {
            let mapped = map_range(&file, start as u64, length as u64).expect("map");
            assert_eq!(
                &mapped[..],
                &content[start..start + length],
                "{start}+{length}"
            );
        }
    }
}
