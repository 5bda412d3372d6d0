//! Named segments and their traffic schedule, for `rebeld replay --segment … --schedule …`.
//!
//! A schedule gives each segment a share of the events at the start and at the end of the
//! run; in between, shares move linearly with the event count. Event `i` of a run of `n`
//! sits at progress `t = i / (n − 1)` (0 for a run of one event), and its segment is drawn
//! from the shares at `t` with a seeded generator, so a seed gives the same sequence of
//! segments on every run of this build.

use std::path::PathBuf;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How far the shares at either end may be from summing to 1.
pub const SUM_TOLERANCE: f64 = 1e-9;

/// Why a `--segment` or `--schedule` value was refused; each message names its flag.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SegmentError {
    /// A `--segment` value is not `NAME=FILE`.
    #[error("--segment {0:?}: expected NAME=FILE")]
    NotNamedFile(String),
    /// A segment name has characters other than letters, digits, `-`, `_` and `.`.
    #[error("--segment {0:?}: a name is letters, digits, '-', '_' or '.'")]
    BadName(String),
    /// Two `--segment` values share a name.
    #[error("--segment {0:?} is given twice")]
    DuplicateSegment(String),
    /// A segment's file does not exist.
    #[error("--segment {name}={}: no such file", path.display())]
    MissingFile {
        /// The segment.
        name: String,
        /// The file.
        path: PathBuf,
    },
    /// A schedule entry is not `NAME:START-END` or `NAME:SHARE`.
    #[error("--schedule {0:?}: expected NAME:START-END or NAME:SHARE")]
    BadEntry(String),
    /// The schedule names a segment no `--segment` defines.
    #[error("--schedule names segment {name:?}, which no --segment defines (known: {known})")]
    UnknownSegment {
        /// The name.
        name: String,
        /// The defined names, comma-separated.
        known: String,
    },
    /// The schedule names a segment twice.
    #[error("--schedule gives segment {0:?} twice")]
    DuplicateEntry(String),
    /// A defined segment has no share in the schedule.
    #[error("--schedule gives no share to segment {0:?} (write {0}:0 to leave it out)")]
    MissingEntry(String),
    /// A share is negative or not finite.
    #[error("--schedule: share {value} of segment {name:?} is not a number from 0 to 1")]
    BadShare {
        /// The segment.
        name: String,
        /// The share.
        value: f64,
    },
    /// The shares at one end do not sum to 1.
    #[error("--schedule: the shares at the {end} sum to {sum}, not 1")]
    BadSum {
        /// `start` or `end`.
        end: &'static str,
        /// Their sum.
        sum: f64,
    },
}

/// A `NAME=FILE` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFile {
    /// The segment name, tagged on every event read from the file.
    pub name: String,
    /// The file.
    pub path: PathBuf,
}

impl FromStr for NamedFile {
    type Err = SegmentError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, path) = text
            .split_once('=')
            .filter(|(name, path)| !name.is_empty() && !path.is_empty())
            .ok_or_else(|| SegmentError::NotNamedFile(text.to_owned()))?;
        check_name(name)?;
        Ok(Self {
            name: name.to_owned(),
            path: PathBuf::from(path),
        })
    }
}

/// Refuses a name that would not fit a metric label or a results column.
fn check_name(name: &str) -> Result<(), SegmentError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || !name.chars().all(allowed) {
        return Err(SegmentError::BadName(name.to_owned()));
    }
    Ok(())
}

/// Checks that the names are distinct and every file exists.
pub fn check_segments(segments: &[NamedFile]) -> Result<(), SegmentError> {
    for (i, segment) in segments.iter().enumerate() {
        if segments[..i].iter().any(|other| other.name == segment.name) {
            return Err(SegmentError::DuplicateSegment(segment.name.clone()));
        }
        if !segment.path.is_file() {
            return Err(SegmentError::MissingFile {
                name: segment.name.clone(),
                path: segment.path.clone(),
            });
        }
    }
    Ok(())
}

/// Each segment's share at the start and at the end of a run, in the segments' order.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    start: Vec<f64>,
    end: Vec<f64>,
}

impl Schedule {
    /// Equal constant shares.
    pub fn uniform(segments: usize) -> Self {
        let share = 1.0 / segments.max(1) as f64;
        Self {
            start: vec![share; segments],
            end: vec![share; segments],
        }
    }

    /// Reads `NAME:START-END` or `NAME:SHARE` entries, comma-separated, one per name of
    /// `names` (the segments, in order).
    pub fn parse(text: &str, names: &[&str]) -> Result<Self, SegmentError> {
        let mut shares: Vec<Option<(f64, f64)>> = vec![None; names.len()];
        for entry in text.split(',').map(str::trim) {
            let (name, range) = entry
                .split_once(':')
                .ok_or_else(|| SegmentError::BadEntry(entry.to_owned()))?;
            let (start, end) =
                parse_range(range).ok_or_else(|| SegmentError::BadEntry(entry.to_owned()))?;
            let index = names
                .iter()
                .position(|known| *known == name)
                .ok_or_else(|| SegmentError::UnknownSegment {
                    name: name.to_owned(),
                    known: names.join(", "),
                })?;
            if shares[index].replace((start, end)).is_some() {
                return Err(SegmentError::DuplicateEntry(name.to_owned()));
            }
            for value in [start, end] {
                if !(0.0..=1.0).contains(&value) {
                    let name = name.to_owned();
                    return Err(SegmentError::BadShare { name, value });
                }
            }
        }

        let mut schedule = Self {
            start: Vec::with_capacity(names.len()),
            end: Vec::with_capacity(names.len()),
        };
        for (name, share) in names.iter().zip(shares) {
            let (start, end) = share.ok_or_else(|| SegmentError::MissingEntry(name.to_string()))?;
            schedule.start.push(start);
            schedule.end.push(end);
        }
        for (end, shares) in [("start", &schedule.start), ("end", &schedule.end)] {
            let sum: f64 = shares.iter().sum();
            if (sum - 1.0).abs() > SUM_TOLERANCE {
                return Err(SegmentError::BadSum { end, sum });
            }
        }
        Ok(schedule)
    }

    /// The segments' shares at progress `t` (0 at the first event, 1 at the last).
    pub fn shares_at(&self, t: f64) -> Vec<f64> {
        self.start
            .iter()
            .zip(&self.end)
            .map(|(start, end)| start + (end - start) * t)
            .collect()
    }

    /// The segment whose slice of `[0, 1)` holds `u`, slices laid out in order by `shares`.
    fn pick(shares: &[f64], u: f64) -> usize {
        let mut upper = 0.0;
        for (index, share) in shares.iter().enumerate() {
            upper += share;
            if u < upper {
                return index;
            }
        }
        // Rounding left `u` just past the last slice: the last segment with a share takes it.
        shares.iter().rposition(|share| *share > 0.0).unwrap_or(0)
    }

    /// The segments of a run of `total` events, drawn with `seed`.
    pub fn draws(&self, total: u64, seed: u64) -> Draws<'_> {
        Draws {
            schedule: self,
            rng: StdRng::seed_from_u64(seed),
            next: 0,
            total,
        }
    }
}

/// `START-END` (the `-` that splits two numbers) or a constant `SHARE`.
fn parse_range(text: &str) -> Option<(f64, f64)> {
    if let Ok(share) = text.parse::<f64>() {
        return Some((share, share));
    }
    text.char_indices()
        .filter(|&(at, c)| c == '-' && at > 0)
        .find_map(|(at, _)| Some((text[..at].parse().ok()?, text[at + 1..].parse().ok()?)))
}

/// The segment index of each event of a run, in order.
#[derive(Debug)]
pub struct Draws<'a> {
    schedule: &'a Schedule,
    rng: StdRng,
    next: u64,
    total: u64,
}

impl Draws<'_> {
    /// Events drawn so far.
    pub fn drawn(&self) -> u64 {
        self.next
    }
}

impl Iterator for Draws<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.next >= self.total {
            return None;
        }
        let t = match self.total {
            0 | 1 => 0.0,
            n => self.next as f64 / (n - 1) as f64,
        };
        self.next += 1;
        let u: f64 = self.rng.random();
        Some(Schedule::pick(&self.schedule.shares_at(t), u))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NAMES: [&str; 2] = ["helpful", "harmless"];

    fn drift() -> Schedule {
        Schedule::parse("helpful:0.8-0.2,harmless:0.2-0.8", &NAMES).unwrap()
    }

    #[test]
    fn shares_move_linearly_from_start_to_end() {
        let schedule = drift();
        for (t, helpful) in [(0.0, 0.8), (0.25, 0.65), (0.5, 0.5), (1.0, 0.2)] {
            let shares = schedule.shares_at(t);
            assert!((shares[0] - helpful).abs() < 1e-12, "{t}: {shares:?}");
            assert!(
                (shares[0] + shares[1] - 1.0).abs() < 1e-12,
                "{t}: {shares:?}"
            );
        }
    }

    #[test]
    fn a_constant_share_and_spaces_are_accepted() {
        let schedule = Schedule::parse(" helpful:0.25 , harmless:0.75-0.75", &NAMES).unwrap();
        assert_eq!(schedule.shares_at(0.3), vec![0.25, 0.75]);
        assert_eq!(schedule.shares_at(1.0), vec![0.25, 0.75]);
        assert_eq!(Schedule::uniform(4).shares_at(0.5), vec![0.25; 4]);
    }

    #[test]
    fn the_first_and_last_draws_follow_the_end_shares() {
        let schedule = Schedule::parse("helpful:1-0,harmless:0-1", &NAMES).unwrap();
        let draws: Vec<usize> = schedule.draws(50, 3).collect();
        assert_eq!(draws.len(), 50);
        assert_eq!(draws[0], 0, "only helpful has a share at the start");
        assert_eq!(draws[49], 1, "only harmless has a share at the end");
        assert_eq!(Schedule::uniform(2).draws(1, 0).count(), 1);
        assert_eq!(Schedule::uniform(2).draws(0, 0).count(), 0);
    }

    #[test]
    fn a_seed_repeats_its_sequence_and_another_seed_does_not() {
        let schedule = drift();
        let run = |seed| schedule.draws(2_000, seed).collect::<Vec<_>>();
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    /// Each segment's count is a sum of independent Bernoulli draws: its mean is the sum of
    /// its shares and its variance at most n/4, so five standard deviations of a run of n
    /// events is at most 2.5·√n (a false failure about once in 3.5 million seeds).
    #[test]
    fn a_long_run_matches_the_scheduled_shares() {
        let schedule = drift();
        let n = 200_000u64;
        let bound = |n: u64| 2.5 * (n as f64).sqrt();
        let draws: Vec<usize> = schedule.draws(n, 11).collect();

        // Over the whole run the helpful share averages (0.8 + 0.2) / 2.
        let helpful = draws.iter().filter(|&&k| k == 0).count() as f64;
        assert!((helpful - 0.5 * n as f64).abs() < bound(n), "{helpful}");

        // The first and last tenths: the mean share there is the share at t = 0.05 and 0.95.
        let tenth = (n / 10) as usize;
        for (window, expected) in [
            (&draws[..tenth], 0.77),
            (&draws[draws.len() - tenth..], 0.23),
        ] {
            let found = window.iter().filter(|&&k| k == 0).count() as f64;
            let mean = expected * tenth as f64;
            assert!(
                (found - mean).abs() < bound(tenth as u64),
                "{found} vs {mean}"
            );
        }
    }

    #[test]
    fn bad_schedules_are_refused_with_the_flag_named() {
        let cases = [
            (
                "helpful:0.8-0.2",
                SegmentError::MissingEntry("harmless".into()),
            ),
            (
                "helpful:0.8-0.2,harmless:0.2-0.8,chatty:0",
                SegmentError::UnknownSegment {
                    name: "chatty".into(),
                    known: "helpful, harmless".into(),
                },
            ),
            (
                "helpful:0.5,helpful:0.5",
                SegmentError::DuplicateEntry("helpful".into()),
            ),
            (
                "helpful:1.1-0.2,harmless:-0.1-0.8",
                SegmentError::BadShare {
                    name: "helpful".into(),
                    value: 1.1,
                },
            ),
            (
                "helpful:-0.2-0.2,harmless:1.2-0.8",
                SegmentError::BadShare {
                    name: "helpful".into(),
                    value: -0.2,
                },
            ),
            (
                "helpful:0.75-0.25,harmless:0.5-0.75",
                SegmentError::BadSum {
                    end: "start",
                    sum: 1.25,
                },
            ),
            (
                "helpful:0.5-0.25,harmless:0.5",
                SegmentError::BadSum {
                    end: "end",
                    sum: 0.75,
                },
            ),
            (
                "helpful=0.5,harmless:0.5",
                SegmentError::BadEntry("helpful=0.5".into()),
            ),
            (
                "helpful:half,harmless:0.5",
                SegmentError::BadEntry("helpful:half".into()),
            ),
        ];
        for (text, expected) in cases {
            let found = Schedule::parse(text, &NAMES).unwrap_err();
            assert_eq!(found, expected, "{text}");
            assert!(found.to_string().starts_with("--schedule"), "{found}");
        }
        // Within the tolerance, a sum is 1.
        assert!(Schedule::parse("helpful:0.1-0.7,harmless:0.9-0.3", &NAMES).is_ok());
    }

    #[test]
    fn bad_segments_are_refused_with_the_flag_named() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let good = format!("helpful={}", file.path().display());
        let segment: NamedFile = good.parse().unwrap();
        assert_eq!(segment.name, "helpful");
        assert_eq!(segment.path, file.path());

        for (text, expected) in [
            ("helpful", SegmentError::NotNamedFile("helpful".into())),
            ("=x.jsonl", SegmentError::NotNamedFile("=x.jsonl".into())),
            ("help ful=x", SegmentError::BadName("help ful".into())),
        ] {
            assert_eq!(text.parse::<NamedFile>().unwrap_err(), expected);
        }

        let twice = [segment.clone(), segment.clone()];
        assert_eq!(
            check_segments(&twice),
            Err(SegmentError::DuplicateSegment("helpful".into()))
        );
        let missing: NamedFile = "harmless=/nonexistent/h.jsonl".parse().unwrap();
        let error = check_segments(&[segment, missing]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "--segment harmless=/nonexistent/h.jsonl: no such file"
        );
    }
}
