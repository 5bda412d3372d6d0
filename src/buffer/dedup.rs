//! A bounded memory of recently seen event ids.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

/// Remembers the most recent `capacity` ids in insertion order and forgets the oldest.
///
/// `contains` and `insert` are O(1). Each id is stored once and shared between the order
/// queue and the lookup set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DedupWindow {
    capacity: usize,
    order: VecDeque<Arc<str>>,
    members: HashSet<Arc<str>>,
}

impl DedupWindow {
    /// An empty window that remembers up to `capacity` ids; 0 remembers nothing.
    pub fn new(capacity: usize) -> Self {
        DedupWindow {
            capacity,
            order: VecDeque::new(),
            members: HashSet::new(),
        }
    }

    /// The most ids the window remembers.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Whether `id` is among the remembered ids.
    pub fn contains(&self, id: &str) -> bool {
        self.members.contains(id)
    }

    /// Remembers `id`, forgetting the oldest id when the window is full.
    ///
    /// Returns false, and changes nothing, when `id` is already remembered: a repeat does not
    /// refresh its place, so an id is forgotten `capacity` insertions after it was first seen.
    pub fn insert(&mut self, id: &str) -> bool {
        if self.members.contains(id) {
            return false;
        }
        if self.capacity == 0 {
            return true;
        }

        if self.order.len() == self.capacity {
            self.forget_oldest();
        }
        let id: Arc<str> = Arc::from(id);
        self.members.insert(Arc::clone(&id));
        self.order.push_back(id);
        true
    }

    /// The remembered ids, oldest first.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.order.iter().map(|id| &**id)
    }

    /// Changes the capacity, forgetting the oldest ids that no longer fit.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        while self.order.len() > capacity {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some(oldest) = self.order.pop_front() {
            self.members.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::DedupWindow;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8),
        Contains(u8),
        SetCapacity(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => any::<u8>().prop_map(|id| Op::Insert(id % 24)),
            3 => any::<u8>().prop_map(|id| Op::Contains(id % 24)),
            1 => (0_usize..12).prop_map(Op::SetCapacity),
        ]
    }

    /// The naive model: a list searched linearly, trimmed from the front.
    struct Model {
        capacity: usize,
        ids: Vec<String>,
    }

    impl Model {
        fn insert(&mut self, id: &str) -> bool {
            if self.ids.iter().any(|held| held == id) {
                return false;
            }
            self.ids.push(id.to_owned());
            self.trim();
            true
        }

        fn trim(&mut self) {
            let excess = self.ids.len().saturating_sub(self.capacity);
            self.ids.drain(..excess);
        }
    }

    proptest! {
        #[test]
        fn matches_a_naive_model(
            capacity in 0_usize..10,
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let mut window = DedupWindow::new(capacity);
            let mut model = Model { capacity, ids: Vec::new() };
            for op in ops {
                match op {
                    Op::Insert(id) => {
                        let id = format!("id-{id}");
                        prop_assert_eq!(window.insert(&id), model.insert(&id));
                    }
                    Op::Contains(id) => {
                        let id = format!("id-{id}");
                        prop_assert_eq!(window.contains(&id), model.ids.contains(&id));
                    }
                    Op::SetCapacity(capacity) => {
                        window.set_capacity(capacity);
                        model.capacity = capacity;
                        model.trim();
                    }
                }

                prop_assert_eq!(window.len(), model.ids.len());
                prop_assert_eq!(window.members.len(), model.ids.len());
                prop_assert!(window.iter().eq(model.ids.iter().map(String::as_str)));
            }
        }
    }

    #[test]
    fn capacity_zero_remembers_nothing() {
        let mut window = DedupWindow::new(0);
        assert!(window.insert("a"));
        assert!(window.insert("a"));
        assert!(!window.contains("a"));
        assert!(window.is_empty());
    }
}
