//! Fault points for reliability tests and operators' drills.
//!
//! `REBELD_FAILPOINTS=name@n,other@n-m,third` arms points by name: the `n`th time the process
//! reaches `name` (the first time without `@n`; every time from `n` to `m` with `@n-m`).
//!
//! Two kinds of point exist:
//! - crash points ([`hit`]) abort the process on an armed hit, with no destructor and no
//!   flush: as abrupt as a SIGKILL;
//! - fault points ([`fires`]) tell the caller to inject a fault (a NaN, an infinity, a full
//!   disk) on an armed hit, so that the code that must survive it runs for real.
//!
//! Unset, every point costs one relaxed atomic load after the first.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

/// The environment variable read once, at the first point reached.
pub const ENV: &str = "REBELD_FAILPOINTS";

/// The crash points rebeld has.
pub const CRASH_POINTS: &[&str] = &[
    "checkpoint.before_marker",
    "resume.before_marker",
    "publish.after_commit",
];

/// The fault points rebeld has, with the fault each injects.
pub const FAULT_POINTS: &[(&str, &str)] = &[
    (
        "train.nan_reward",
        "the first pair of a step gets a NaN reward difference",
    ),
    (
        "train.inf_anchor",
        "the first pair of a step gets an infinite anchor log-prob",
    ),
    (
        "train.nan_loss",
        "the first pointwise loss of a step is NaN",
    ),
    (
        "train.nan_gradient",
        "one entry of a step's accumulated gradient is NaN",
    ),
    (
        "checkpoint.disk_full",
        "a publication's weights find the disk full",
    ),
    (
        "resume.disk_full",
        "a resume generation's buffer snapshot finds the disk full",
    ),
];

/// Linux's "No space left on device".
const ENOSPC: i32 = 28;

struct Armed {
    at: HashMap<String, RangeInclusive<u64>>,
    hits: Mutex<HashMap<String, u64>>,
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
static ANY: AtomicU64 = AtomicU64::new(u64::MAX);

/// The hits each entry of `spec` arms; an unreadable count means the first hit.
fn parse(spec: &str) -> HashMap<String, RangeInclusive<u64>> {
    spec.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| match entry.split_once('@') {
            Some((name, hits)) => (name.to_owned(), parse_hits(hits)),
            None => (entry.to_owned(), 1..=1),
        })
        .collect()
}

fn parse_hits(hits: &str) -> RangeInclusive<u64> {
    let number = |text: &str| text.trim().parse().unwrap_or(1);
    match hits.split_once('-') {
        Some((first, last)) => number(first)..=number(last),
        None => number(hits)..=number(hits),
    }
}

/// Counts a hit of `name`; true when this hit is armed.
fn armed_hit(name: &str) -> bool {
    if ANY.load(Ordering::Relaxed) == 0 {
        return false;
    }
    let armed = ARMED.get_or_init(|| {
        let at = std::env::var(ENV).map(|s| parse(&s)).unwrap_or_default();
        ANY.store(at.len() as u64, Ordering::Relaxed);
        (!at.is_empty()).then(|| Armed {
            at,
            hits: Mutex::new(HashMap::new()),
        })
    });
    let Some(armed) = armed else {
        return false;
    };
    let Some(range) = armed.at.get(name) else {
        return false;
    };

    let mut hits = armed.hits.lock().unwrap_or_else(PoisonError::into_inner);
    let count = hits.entry(name.to_owned()).or_default();
    *count += 1;
    range.contains(count)
}

/// Aborts the process if this hit of crash point `name` is armed.
pub fn hit(name: &str) {
    if armed_hit(name) {
        eprintln!("failpoint {name} reached: aborting");
        std::process::abort();
    }
}

/// True if this hit of fault point `name` is armed: the caller then injects its fault.
pub fn fires(name: &str) -> bool {
    let fire = armed_hit(name);
    if fire {
        tracing::warn!(point = name, "failpoint fired: injecting its fault");
    }
    fire
}

/// The error of a full disk when fault point `name` fires: the write it guards fails as if
/// the file system had run out of space.
pub fn disk_full(name: &str) -> std::io::Result<()> {
    match fires(name) {
        true => Err(std::io::Error::from_raw_os_error(ENOSPC)),
        false => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_points_and_their_hits() {
        let parsed = parse(" checkpoint.before_marker@2, resume.before_marker ,train.nan_loss@3-5");
        assert_eq!(parsed.get("checkpoint.before_marker"), Some(&(2..=2)));
        assert_eq!(parsed.get("resume.before_marker"), Some(&(1..=1)));
        assert_eq!(parsed.get("train.nan_loss"), Some(&(3..=5)));
        assert_eq!(parsed.len(), 3);
    }
}
