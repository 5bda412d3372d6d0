//! Sizes in bytes written the way people write them: `512MiB`, `2 GB`, `4096`.

use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes. Deserializes from an integer or a string with a unit
/// (`B`, `KB`/`MB`/`GB` in powers of 1000, `KiB`/`MiB`/`GiB` in powers of 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

const UNITS: [(&str, u64); 7] = [
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (number, multiplier) = UNITS
            .iter()
            .find_map(|(unit, scale)| text.strip_suffix(unit).map(|n| (n.trim(), *scale)))
            .unwrap_or((text, 1));

        let value: u64 = number
            .replace('_', "")
            .parse()
            .map_err(|_| format!("`{text}` is not a size such as 512MiB or 4096"))?;
        value
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}` does not fit in 64 bits"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exact = UNITS
            .iter()
            .find(|(_, scale)| *scale > 1 && self.0 >= *scale && self.0.is_multiple_of(*scale));
        match exact {
            Some((unit, scale)) => write!(f, "{}{unit}", self.0 / scale),
            None => write!(f, "{}B", self.0),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Number(i64),
            Text(String),
        }

        match Written::deserialize(deserializer)? {
            Written::Number(n) => u64::try_from(n)
                .map(ByteSize)
                .map_err(|_| de::Error::custom(format!("a size cannot be negative, got {n}"))),
            Written::Text(text) => text.parse().map_err(de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_in_both_systems() {
        assert_eq!("512MiB".parse(), Ok(ByteSize(512 << 20)));
        assert_eq!("2 GB".parse(), Ok(ByteSize(2_000_000_000)));
        assert_eq!("4_096".parse(), Ok(ByteSize(4096)));
        assert!("12 apples".parse::<ByteSize>().is_err());
        assert!("99999999999GiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn display_round_trips() {
        for size in [
            ByteSize(1),
            ByteSize(1 << 20),
            ByteSize(3_000),
            ByteSize(1_500),
        ] {
            assert_eq!(size.to_string().parse(), Ok(size));
        }
    }
}
