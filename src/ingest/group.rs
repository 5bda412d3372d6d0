//! Noticing that the group coordinator has left this consumer short of partitions.
//!
//! A member that dies without leaving keeps its partitions until its session expires. Kafka
//! then rebalances; tansu 0.6 instead drops the dead member and answers the survivor's rejoin
//! with its old assignment, so the dead member's partitions are read by nobody, for ever.
//! Only the broker knows who is still in the group, so a consumer holding fewer partitions
//! than the topic has asks it every [`CHECK_EVERY`] (a metadata request, then librdkafka's
//! group listing: `ListGroups` to each broker and `DescribeGroups` to the coordinator).
//! Starved for [`REJOIN_AFTER`] in a row, the consumer leaves the group and joins afresh;
//! the leave makes the coordinator start a new generation and assign every partition.
//!
//! What this does not catch: with two or more survivors, each holds some partitions in a
//! group of several members, which is also what a healthy group looks like.

use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;

/// How often a consumer short of partitions asks the broker about its group; a starved
/// consumer rejoins after being found starved at every check for [`REJOIN_AFTER`].
pub const CHECK_EVERY: Duration = Duration::from_secs(10);
/// Longest wait for each of the broker's two answers.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a consumer stays starved before it rejoins its group.
pub const REJOIN_AFTER: Duration = Duration::from_secs(30);

/// What the broker says about the consumer group and the topic it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupView {
    /// Members the coordinator holds in the group, this one included once it has joined.
    pub members: usize,
    /// Partitions of the topic.
    pub partitions: usize,
}

impl GroupView {
    /// Asks the broker; blocks for up to twice [`CHECK_TIMEOUT`]. `None` when the answer
    /// cannot be relied on: the topic is unknown or has no partition, or the group is not
    /// described as settled (`Stable`) with at least one member.
    pub fn fetch<C: ConsumerContext>(
        consumer: &impl Consumer<C>,
        topic: &str,
        group: &str,
    ) -> KafkaResult<Option<Self>> {
        let metadata = consumer.fetch_metadata(Some(topic), CHECK_TIMEOUT)?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        drop(metadata);
        if partitions == 0 {
            return Ok(None);
        }

        let groups = consumer.fetch_group_list(Some(group), CHECK_TIMEOUT)?;
        let members = groups
            .groups()
            .iter()
            .find(|g| g.name() == group && g.state() == "Stable")
            .map(|g| g.members().len())
            .filter(|&members| members > 0);
        drop(groups);

        Ok(members.map(|members| Self {
            members,
            partitions,
        }))
    }
}

/// Whether a consumer holding `assigned` partitions is starved: alone in its group yet short
/// of the topic's partitions, or holding none while the group has no more members than the
/// topic has partitions (so each member should have one). Without the broker's view only
/// holding none counts.
pub fn starved(assigned: usize, view: Option<GroupView>) -> bool {
    match view {
        None => assigned == 0,
        Some(view) if view.members <= 1 => assigned < view.partitions,
        Some(view) => assigned == 0 && view.members <= view.partitions,
    }
}

/// The consumer's memory of the broker's answers and of how long it has been starved.
#[derive(Debug, Default)]
pub struct GroupWatch {
    view: Option<GroupView>,
    starved_since: Option<Instant>,
}

impl GroupWatch {
    /// Whether to ask the broker: this consumer may be short, holding fewer partitions
    /// than the topic last had (or nothing is known yet).
    pub fn should_ask(&self, assigned: usize) -> bool {
        self.view.is_none_or(|view| assigned < view.partitions)
    }

    /// Keeps the broker's answer; `None` when it could not be had or relied on.
    pub fn record(&mut self, view: Option<GroupView>) {
        self.view = view;
    }

    /// The last answer kept.
    pub fn view(&self) -> Option<GroupView> {
        self.view
    }

    /// Whether to rejoin now: starved without a break for [`REJOIN_AFTER`]. A `true` answer
    /// starts the watch afresh, as the rejoin changes the group.
    pub fn should_rejoin(&mut self, assigned: usize, now: Instant) -> bool {
        if !starved(assigned, self.view) {
            self.starved_since = None;
            return false;
        }
        let since = *self.starved_since.get_or_insert(now);
        if now.duration_since(since) < REJOIN_AFTER {
            return false;
        }
        *self = Self::default();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(members: usize, partitions: usize) -> Option<GroupView> {
        Some(GroupView {
            members,
            partitions,
        })
    }

    #[test]
    fn a_lone_member_short_of_partitions_is_starved() {
        assert!(starved(1, view(1, 3)));
        assert!(starved(0, view(1, 3)));
        assert!(!starved(3, view(1, 3)));
    }

    #[test]
    fn a_member_among_several_is_starved_only_with_nothing_to_read() {
        assert!(!starved(1, view(2, 3)));
        assert!(starved(0, view(2, 3)));
        assert!(starved(0, view(3, 3)));
        // More members than partitions: someone must go without.
        assert!(!starved(0, view(4, 3)));
    }

    #[test]
    fn without_the_brokers_view_only_an_empty_assignment_counts() {
        assert!(starved(0, None));
        assert!(!starved(1, None));
    }

    #[test]
    fn rejoins_only_after_being_starved_without_a_break() {
        let start = Instant::now();
        let mut watch = GroupWatch::default();
        watch.record(view(1, 3));

        assert!(!watch.should_rejoin(2, start));
        assert!(!watch.should_rejoin(2, start + REJOIN_AFTER / 2));
        // A full assignment in between restarts the clock.
        assert!(!watch.should_rejoin(3, start + REJOIN_AFTER / 2));
        assert!(!watch.should_rejoin(2, start + REJOIN_AFTER));
        assert!(watch.should_rejoin(2, start + REJOIN_AFTER * 2));
        assert_eq!(watch.view(), None, "a rejoin forgets the old view");
    }

    #[test]
    fn asks_the_broker_only_while_short() {
        let mut watch = GroupWatch::default();
        assert!(watch.should_ask(3), "nothing known yet");

        watch.record(view(1, 3));
        assert!(!watch.should_ask(3), "holds every partition");
        assert!(watch.should_ask(2));

        watch.record(None);
        assert!(watch.should_ask(3), "the last answer was unusable");
    }
}
