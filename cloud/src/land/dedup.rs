//! Batch-level deduplication of producer resends: `(agent_id, batch_seq)` landed before *from another Kinesis
//! record* → skip. Pure.
//!
//! Each landed batch is remembered with a tag of the record it came from (a hash of shard id and sequence
//! number). Reading the *same* record again (a replay after a restart or a lease move) is not a duplicate: the
//! replay must produce the same rows as the first pass so that rewritten Parquet files replace the old ones
//! with identical content. Only a *different* record carrying an already landed batch (the agent resent it)
//! is skipped.
//!
//! Per agent, a window of the last [`WINDOW`] sequence numbers below the highest seen is kept (4 bytes each,
//! 64 KiB per agent). Above the window's top a number is new; inside it, it is new unless its slot holds a
//! tag; below the window it is treated as new (landing twice is repaired by the sinks' idempotence, dropping
//! would lose data).

use std::collections::HashMap;

/// Sequence numbers remembered per agent below the highest seen.
pub const WINDOW: u64 = 16_384;

/// The tag of a Kinesis record: never 0 (0 marks an empty slot).
pub fn tag(shard: &str, sequence_number: &str) -> u32 {
    // FNV-1a, 32 bit: stable across processes and platforms.
    let mut h: u32 = 0x811c_9dc5;
    for b in shard.bytes().chain([0u8]).chain(sequence_number.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

#[derive(Debug, Clone)]
struct Window {
    high: u64,
    tags: Vec<u32>, // slot (seq % WINDOW): tag of the record that landed seq, valid for seq in (high - WINDOW, high]
}

impl Window {
    fn new() -> Self {
        Self {
            high: 0,
            tags: vec![0; WINDOW as usize],
        }
    }
    fn get(&self, seq: u64) -> u32 {
        if seq > self.high || self.high - seq >= WINDOW {
            return 0;
        }
        self.tags[(seq % WINDOW) as usize]
    }
    fn insert(&mut self, seq: u64, tag: u32) {
        if seq > self.high {
            // Clear the slots of the numbers that fall out of the window.
            let advance = seq - self.high;
            if advance >= WINDOW {
                self.tags.iter_mut().for_each(|t| *t = 0);
            } else {
                for s in self.high + 1..=seq {
                    self.tags[(s % WINDOW) as usize] = 0;
                }
            }
            self.high = seq;
        } else if self.high - seq >= WINDOW {
            return;
        }
        self.tags[(seq % WINDOW) as usize] = tag;
    }
}

/// Remembers which batches were landed, and from which record.
#[derive(Debug, Default)]
pub struct BatchDedup {
    agents: HashMap<String, Window>,
}

impl BatchDedup {
    /// An empty memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `(agent, seq)` for the record tagged `tag`: `true` if the batch should be landed (never seen,
    /// or seen from this same record), `false` if another record already landed it.
    pub fn claim(&mut self, agent: &str, seq: u64, tag: u32) -> bool {
        let w = match self.agents.get_mut(agent) {
            Some(w) => w,
            None => self
                .agents
                .entry(agent.to_owned())
                .or_insert_with(Window::new),
        };
        match w.get(seq) {
            0 => {
                w.insert(seq, tag);
                true
            }
            t => t == tag,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_resend_is_skipped_but_a_replay_of_the_same_record_is_not() {
        let mut d = BatchDedup::new();
        let (r1, r2) = (tag("shard-1", "100"), tag("shard-2", "100"));
        assert_ne!(r1, r2);
        assert!(d.claim("a", 1, r1), "first sight lands");
        assert!(
            d.claim("a", 1, r1),
            "a replay of the same record lands again"
        );
        assert!(
            !d.claim("a", 1, r2),
            "a resend in another record is skipped"
        );
        assert!(d.claim("b", 1, r2), "agents are separate");
        assert!(d.claim("a", 2, r2));
    }

    proptest! {
        /// Against a model map: within the window the answer is exact; a batch is never skipped unless
        /// another record landed it.
        #[test]
        fn matches_a_map_within_the_window(ops in prop::collection::vec((0u64..50_000, 0u32..3), 1..400)) {
            let mut d = BatchDedup::new();
            let mut model: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
            let mut high = 0u64;
            for (seq, rec) in ops {
                let t = rec + 1;
                let in_window = seq + WINDOW > high;
                let landed = d.claim("a", seq, t);
                if !in_window {
                    prop_assert!(landed, "below the window a batch is treated as new");
                } else if let Some(first) = model.get(&seq) {
                    prop_assert_eq!(landed, *first == t, "seq {} tag {}", seq, t);
                } else {
                    prop_assert!(landed);
                    model.insert(seq, t);
                }
                high = high.max(seq);
            }
        }
    }
}
