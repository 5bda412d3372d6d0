//! The next offset of every partition, as far as the buffer is concerned.
//!
//! An offset advances only once its message is in the buffer or acknowledged by the
//! dead-letter topic. The snapshot stores this map; a message below it after a restart is
//! already accounted for and is skipped (counted as replayed).

use std::collections::BTreeMap;

/// A topic and partition.
pub type PartitionKey = (String, i32);

/// Next offset per partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionOffsets {
    next: BTreeMap<PartitionKey, i64>,
}

/// What to do with a consumed message given what the buffer already holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// New: process it.
    New,
    /// Already in the buffer or dead-lettered before the last snapshot.
    AlreadySeen,
}

impl PartitionOffsets {
    /// From a snapshot's map.
    pub fn from_map(next: BTreeMap<PartitionKey, i64>) -> Self {
        Self { next }
    }

    /// The map, for a snapshot.
    pub fn as_map(&self) -> &BTreeMap<PartitionKey, i64> {
        &self.next
    }

    /// Whether a message at `offset` still needs processing.
    pub fn position(&self, topic: &str, partition: i32, offset: i64) -> Position {
        match self.next.get(&(topic.to_owned(), partition)) {
            Some(&next) if offset < next => Position::AlreadySeen,
            _ => Position::New,
        }
    }

    /// Records that every message up to and including `offset` is accounted for.
    pub fn advance(&mut self, topic: &str, partition: i32, offset: i64) {
        let next = self.next.entry((topic.to_owned(), partition)).or_insert(0);
        *next = (*next).max(offset + 1);
    }

    /// The next offset of one partition, if any message of it was seen.
    pub fn next_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.next.get(&(topic.to_owned(), partition)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_below_the_next_offset_are_already_seen() {
        let mut offsets = PartitionOffsets::default();
        assert_eq!(offsets.position("t", 0, 0), Position::New);

        offsets.advance("t", 0, 4);
        assert_eq!(offsets.position("t", 0, 4), Position::AlreadySeen);
        assert_eq!(offsets.position("t", 0, 5), Position::New);
        assert_eq!(offsets.position("t", 1, 0), Position::New);
        assert_eq!(offsets.next_offset("t", 0), Some(5));
    }

    #[test]
    fn offsets_never_move_backwards() {
        let mut offsets = PartitionOffsets::default();
        offsets.advance("t", 2, 10);
        offsets.advance("t", 2, 3);

        assert_eq!(offsets.next_offset("t", 2), Some(11));
    }
}
