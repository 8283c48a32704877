//! Batch-level deduplication: `(agent_id, batch_seq)` seen before → skip. Pure.
//!
//! Per agent, a window of the last [`WINDOW`] sequence numbers below the highest seen is kept as a bitset.
//! A number above the window's top is new; inside the window it is new unless its bit is set; below the window
//! it is unknown and treated as new (landing twice is repaired by the sinks' idempotence; dropping would lose
//! data). Memory: `WINDOW / 8` bytes per agent.

use std::collections::HashMap;

/// Sequence numbers remembered per agent below the highest seen.
pub const WINDOW: u64 = 65_536;

#[derive(Debug, Clone)]
struct Window {
    high: u64,
    bits: Vec<u64>, // bit (seq % WINDOW) set = seen, valid for seq in (high - WINDOW, high]
}

impl Window {
    fn new() -> Self {
        Self {
            high: 0,
            bits: vec![0; (WINDOW / 64) as usize],
        }
    }
    fn slot(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }
    fn contains(&self, seq: u64) -> bool {
        if seq > self.high || self.high - seq >= WINDOW {
            return false;
        }
        let (w, b) = Self::slot(seq);
        self.bits[w] & b != 0
    }
    fn insert(&mut self, seq: u64) {
        if seq > self.high {
            // Clear the slots of the numbers that fall out of the window.
            let advance = seq - self.high;
            if advance >= WINDOW {
                self.bits.iter_mut().for_each(|w| *w = 0);
            } else {
                for s in self.high + 1..=seq {
                    let (w, b) = Self::slot(s);
                    self.bits[w] &= !b;
                }
            }
            self.high = seq;
        } else if self.high - seq >= WINDOW {
            return;
        }
        let (w, b) = Self::slot(seq);
        self.bits[w] |= b;
    }
}

/// Remembers which batches were landed.
#[derive(Debug, Default)]
pub struct BatchDedup {
    agents: HashMap<String, Window>,
}

impl BatchDedup {
    /// An empty memory.
    pub fn new() -> Self {
        Self::default()
    }
    /// Whether `(agent, seq)` was marked before (within the window).
    pub fn seen(&self, agent: &str, seq: u64) -> bool {
        self.agents.get(agent).is_some_and(|w| w.contains(seq))
    }
    /// Marks `(agent, seq)` as landed.
    pub fn mark(&mut self, agent: &str, seq: u64) {
        if let Some(w) = self.agents.get_mut(agent) {
            w.insert(seq);
        } else {
            let mut w = Window::new();
            w.insert(seq);
            self.agents.insert(agent.to_owned(), w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn a_batch_is_seen_after_it_is_marked_and_agents_are_separate() {
        let mut d = BatchDedup::new();
        assert!(!d.seen("a", 1));
        d.mark("a", 1);
        assert!(d.seen("a", 1));
        assert!(!d.seen("b", 1));
        assert!(!d.seen("a", 2));
    }

    proptest! {
        /// Against a model set: within the window the answer is exact; nothing is ever reported seen that was not marked.
        #[test]
        fn matches_a_set_within_the_window(ops in prop::collection::vec(0u64..200_000, 1..400)) {
            let mut d = BatchDedup::new();
            let mut model = HashSet::new();
            let mut high = 0u64;
            for seq in ops {
                let in_window = seq > high.saturating_sub(WINDOW) || high < WINDOW;
                if d.seen("a", seq) {
                    prop_assert!(model.contains(&seq), "false positive for {}", seq);
                } else if in_window && seq <= high {
                    prop_assert!(!model.contains(&seq), "missed {} (high {})", seq, high);
                }
                d.mark("a", seq);
                model.insert(seq);
                high = high.max(seq);
            }
        }
    }
}
