//! Batch-level deduplication of producer resends, and detection of agent ids shared by two live agents. Pure,
//! bounded in memory.
//!
//! # Batch identity
//! A batch is identified by `(agent_id, epoch, seq)`: the epoch is drawn at random when the agent creates its
//! buffer file (see `proto/FORMAT.md`), so a re-imaged gateway, a replaced SD card or a recovered buffer, which
//! number batches from 1 again, never collide with the batches of the buffer they replace. Records written
//! before epochs existed carry epoch 0 and are keyed like any other epoch.
//!
//! `(agent_id, epoch, seq)` landed before *from another Kinesis record with the same bytes* → skip. Each landed
//! batch is remembered with two 32-bit tags: of the record it came from (a hash of shard id and sequence
//! number) and of its content (a hash of the record's bytes). Reading the *same* record again (a replay after a
//! restart or a lease move) is not a duplicate: the replay must produce the same rows as the first pass so that
//! rewritten Parquet files replace the old ones with identical content. A *different* record with the same
//! identity and the same bytes is a resend (the agent stores sealed records and resends them byte-identical):
//! skipped. A different record with the same identity and *other* bytes is a **collision** — a buffer file
//! restored from a backup or snapshot (its epoch kept, its numbering rewound), or cloned with a golden image onto
//! several boxes: landed (never skip data that did not land) and reported. Tags collide with probability 2^-32:
//! a resend taken for a replay lands twice; a collision taken for a resend would be skipped.
//!
//! Per `(agent, epoch)` a window of the last `window` sequence numbers up to the highest seen is kept (8 bytes
//! each, grown only as far as the numbers seen reach: a new epoch starts small). The default window (16,384)
//! holds more records than an agent's default buffer (256 MiB of 24 KiB records): an agent's resend is never
//! older than its buffer, so it is caught however long its backlog. Above the window's top a
//! number is new; inside it, it is new unless its slot holds a tag; below the window it is treated as new.
//!
//! # Across processes
//! The memory lives in one process. A worker that takes a shard (after a restart, a kill, a lease move) first
//! reads the shard's records of the last `warmup_s` before its checkpoint and claims them without landing
//! (`consumer::reader::warm`), so an agent's resend of a batch the previous owner landed shortly before is still
//! skipped. A resend older than that, or one on another shard than its original (resharding), lands again.
//!
//! # Memory bound and what eviction costs
//! All agents together are held under `max_bytes` (counted: window slots by capacity, plus a fixed overhead
//! per agent and per epoch). When a claim takes the total over, the least recently used agents are forgotten
//! whole. Forgetting is safe: a forgotten agent's next batches are all treated as new, so nothing that was not
//! landed is ever skipped. The cost: a *resend* of a batch landed before the eviction lands again — Parquet
//! gets that batch's rows twice (with the same `agent_id`, `batch_epoch`, `batch_seq`, so they can be removed
//! downstream), Timestream rewrites the same records with the same versions (a no-op). Conflict detection
//! for that agent starts over. Below the window, the same holds for a resend older than `window` batches.
//!
//! Old epochs do not hold memory for good: per agent at most [`MAX_EPOCHS`] epochs are remembered (the one
//! seen first is forgotten first), and the window of an older epoch that landed no new batch while the agent
//! landed `window` new ones is freed (a late resend of it is then treated as new).
//!
//! # Two live agents with one agent id
//! A config copied to a second box gives two buffers (two epochs) under one agent id, both sending. A
//! re-image looks alike at first (a new epoch appears) but the old epoch stops. The difference: after a
//! newer epoch of the agent started, an *older* epoch keeps landing *new* batches (never seen, not a resend
//! or replay). To let the last batches of a re-imaged box trail, an older epoch's new batches count as a
//! conflict only once the agent landed [`CONFLICT_GRACE`] new batches (of any epoch) since the newer epoch's
//! first one. Epoch 0 (records from before epochs) is never part of a conflict: an upgraded agent sends its
//! old backlog under epoch 0 while it seals new batches under its epoch. Resends and replays never count.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// New batches an agent lands after a newer epoch's first one before an older epoch's new batches count as
/// a conflict (the last batches of a re-imaged box may trail).
pub const CONFLICT_GRACE: u64 = 32;

/// Epochs remembered per agent.
pub const MAX_EPOCHS: usize = 4;

/// At most one conflict report per agent in this many milliseconds.
pub const REPORT_EVERY_MS: i64 = 60_000;

/// Bytes counted per remembered agent besides its id and windows (state, map entries, LRU entry).
const AGENT_OVERHEAD: usize = 192 + std::mem::size_of::<AgentState>();

/// Bytes counted per remembered epoch besides its window's slots.
const EPOCH_OVERHEAD: usize = std::mem::size_of::<EpochState>();

/// Bytes one agent with `epochs` full windows of `window` slots is counted at, at most (the id aside).
pub fn agent_bytes_max(window: u64, epochs: usize) -> usize {
    AGENT_OVERHEAD + epochs * (EPOCH_OVERHEAD + 8 * window as usize)
}

/// FNV-1a, 32 bit: stable across processes and platforms.
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The tag of a Kinesis record: never 0 (0 marks an empty slot).
pub fn tag(shard: &str, sequence_number: &str) -> u32 {
    fnv1a(shard.bytes().chain([0u8]).chain(sequence_number.bytes())).max(1)
}

/// The tag of a record's content (its bytes).
pub fn content_tag(record: &[u8]) -> u32 {
    fnv1a(record.iter().copied())
}

/// A remembered batch: record tag (high 32 bits, never 0) and content tag (low 32 bits); 0 = empty.
type Slot = u64;

fn slot(tag: u32, content: u32) -> Slot {
    (u64::from(tag.max(1)) << 32) | u64::from(content)
}

/// Slots of the numbers up to `high`: the last slot is `high`, the first `high + 1 - len`.
#[derive(Debug, Clone, Default)]
struct Window {
    high: u64,
    tags: VecDeque<Slot>,
}

impl Window {
    fn get(&self, seq: u64) -> Slot {
        if seq > self.high {
            return 0;
        }
        let back = self.high - seq;
        if back >= self.tags.len() as u64 {
            return 0;
        }
        self.tags[self.tags.len() - 1 - back as usize]
    }

    fn insert(&mut self, seq: u64, tag: Slot, cap: u64) {
        if self.tags.is_empty() || seq > self.high {
            let advance = if self.tags.is_empty() {
                cap
            } else {
                seq - self.high
            };
            if advance >= cap {
                self.tags.clear();
            } else {
                // Drop what falls out of the window first, so the length never passes `cap`.
                let keep = (cap - advance) as usize;
                while self.tags.len() > keep {
                    self.tags.pop_front();
                }
                self.tags
                    .extend(std::iter::repeat_n(0, advance as usize - 1));
            }
            self.tags.push_back(tag);
            self.high = seq;
            self.trim(cap);
            return;
        }
        let back = self.high - seq;
        if back >= cap {
            return; // below the window: not remembered
        }
        let back = back as usize;
        while self.tags.len() <= back {
            self.tags.push_front(0);
        }
        let at = self.tags.len() - 1 - back;
        self.tags[at] = tag;
        self.trim(cap);
    }

    /// Growth may reserve past the window; give the excess back, so a window never holds more than `cap` slots.
    fn trim(&mut self, cap: u64) {
        if self.tags.capacity() as u64 > cap {
            self.tags.shrink_to(cap as usize);
        }
    }

    fn bytes(&self) -> usize {
        8 * self.tags.capacity()
    }
}

/// What to do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Never seen (or forgotten): land it.
    New,
    /// Seen from this same record (a replay): land it again, identically.
    Replay,
    /// Landed from another record with the same bytes (the agent resent it): skip it.
    Resend,
    /// Landed from another record with *other* bytes under the same identity (a restored or cloned buffer
    /// file): land it, and report.
    Collision,
}

impl Verdict {
    /// Whether the batch goes to the sinks.
    pub fn lands(self) -> bool {
        self != Verdict::Resend
    }
}

/// A new batch of an older epoch while a newer epoch of the same agent id is sending, or a batch identity
/// reused with other content ([`Verdict::Collision`]: then `older == newer`, the batch's epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    /// The epoch of the batch.
    pub older: u64,
    /// The newest epoch of the agent id.
    pub newer: u64,
    /// Whether to log it (at most once per agent per [`REPORT_EVERY_MS`]); count it either way.
    pub report: bool,
}

/// The answer to [`BatchDedup::claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Land or skip.
    pub verdict: Verdict,
    /// Set when the batch shows two live agents sharing its agent id.
    pub conflict: Option<Conflict>,
    /// Agents forgotten to stay under the memory bound.
    pub evicted: usize,
}

#[derive(Debug)]
struct EpochState {
    epoch: u64,
    /// `None` once retired.
    window: Option<Window>,
    /// Agent clock at this epoch's first and last new batch.
    first: u64,
    last: u64,
}

#[derive(Debug, Default)]
struct AgentState {
    /// New batches landed for this agent.
    clock: u64,
    /// Ordered by first sight: the newest epoch is last.
    epochs: Vec<EpochState>,
    last_report_ms: Option<i64>,
    /// LRU position.
    used: u64,
    /// Bytes counted for this agent.
    bytes: usize,
}

impl AgentState {
    fn count_bytes(&self, id: &str) -> usize {
        AGENT_OVERHEAD
            + id.len()
            + self
                .epochs
                .iter()
                .map(|e| EPOCH_OVERHEAD + e.window.as_ref().map_or(0, Window::bytes))
                .sum::<usize>()
    }
}

/// Remembers which batches were landed, and from which record, within a memory bound.
#[derive(Debug)]
pub struct BatchDedup {
    agents: HashMap<Arc<str>, AgentState>,
    /// LRU order: `used` → agent.
    lru: BTreeMap<u64, Arc<str>>,
    tick: u64,
    bytes: usize,
    max_bytes: usize,
    window: u64,
}

impl BatchDedup {
    /// An empty memory of at most `max_bytes`, remembering `window` sequence numbers per agent epoch.
    /// `max_bytes` should hold several agents at their largest ([`agent_bytes_max`]); the agent being claimed
    /// is never evicted, so one agent may exceed a smaller bound.
    pub fn new(max_bytes: usize, window: u64) -> Self {
        Self {
            agents: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            bytes: 0,
            max_bytes,
            window: window.max(1),
        }
    }

    /// Bytes counted now.
    pub fn memory_bytes(&self) -> usize {
        self.bytes
    }

    /// Agents remembered now.
    pub fn agents(&self) -> usize {
        self.agents.len()
    }

    /// Claims `(agent, epoch, seq)` for the record tagged `tag` ([`tag`]) whose bytes are tagged `content`
    /// ([`content_tag`]), at `now_ms` (for rate-limiting reports).
    pub fn claim(
        &mut self,
        agent: &str,
        epoch: u64,
        seq: u64,
        tag: u32,
        content: u32,
        now_ms: i64,
    ) -> Claim {
        self.tick += 1;
        let tick = self.tick;
        let a = match self.agents.get_mut(agent) {
            Some(a) => {
                self.lru.remove(&a.used);
                a
            }
            None => {
                let id: Arc<str> = Arc::from(agent);
                self.agents.entry(id).or_default()
            }
        };
        a.used = tick;
        let (verdict, conflict) =
            Self::claim_in(a, self.window, epoch, seq, slot(tag, content), now_ms);
        let before = a.bytes;
        a.bytes = a.count_bytes(agent);
        self.bytes = self.bytes - before + a.bytes;
        let key = self
            .agents
            .get_key_value(agent)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| Arc::from(agent));
        self.lru.insert(tick, key);
        let mut evicted = 0;
        while self.bytes > self.max_bytes {
            let Some((&used, _)) = self.lru.first_key_value() else {
                break;
            };
            if used == tick {
                break; // only the agent being claimed is left
            }
            if let Some((_, id)) = self.lru.pop_first() {
                if let Some(gone) = self.agents.remove(&id) {
                    self.bytes -= gone.bytes;
                    evicted += 1;
                }
            }
        }
        Claim {
            verdict,
            conflict,
            evicted,
        }
    }

    fn claim_in(
        a: &mut AgentState,
        window: u64,
        epoch: u64,
        seq: u64,
        tag: Slot,
        now_ms: i64,
    ) -> (Verdict, Option<Conflict>) {
        let idx = match a.epochs.iter().position(|e| e.epoch == epoch) {
            Some(i) => i,
            None => {
                if a.epochs.len() >= MAX_EPOCHS {
                    a.epochs.remove(0);
                }
                a.epochs.push(EpochState {
                    epoch,
                    window: None,
                    first: a.clock + 1,
                    last: a.clock + 1,
                });
                a.epochs.len() - 1
            }
        };
        let w = a.epochs[idx].window.get_or_insert_with(Window::default);
        let verdict = match w.get(seq) {
            0 => {
                w.insert(seq, tag, window);
                Verdict::New
            }
            t if t >> 32 == tag >> 32 => Verdict::Replay,
            t if t as u32 == tag as u32 => Verdict::Resend,
            _ => Verdict::Collision,
        };
        if verdict == Verdict::Collision {
            let report = Self::may_report(a, now_ms);
            return (
                verdict,
                Some(Conflict {
                    older: epoch,
                    newer: epoch,
                    report,
                }),
            );
        }
        if verdict != Verdict::New {
            return (verdict, None);
        }
        a.clock += 1;
        let clock = a.clock;
        a.epochs[idx].last = clock;
        // A newer epoch (first seen after this one) that started more than the grace ago.
        let newer = (epoch != 0)
            .then(|| {
                a.epochs[idx + 1..]
                    .iter()
                    .rev()
                    .find(|e| e.epoch != 0 && clock - e.first >= CONFLICT_GRACE)
                    .map(|e| e.epoch)
            })
            .flatten();
        let newest = a.epochs.len() - 1;
        for e in &mut a.epochs[..newest] {
            if clock - e.last > window {
                e.window = None;
            }
        }
        let conflict = newer.map(|newer| Conflict {
            older: epoch,
            newer,
            report: Self::may_report(a, now_ms),
        });
        (verdict, conflict)
    }

    /// Whether a report of this agent may be logged now (at most once per [`REPORT_EVERY_MS`]).
    fn may_report(a: &mut AgentState, now_ms: i64) -> bool {
        let report = a
            .last_report_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= REPORT_EVERY_MS);
        if report {
            a.last_report_ms = Some(now_ms);
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WINDOW: u64 = 16_384;

    fn big() -> BatchDedup {
        BatchDedup::new(usize::MAX, WINDOW)
    }

    /// The content tag a batch's record has: the same for every resend of `(agent, epoch, seq)`.
    fn content_of(agent: &str, epoch: u64, seq: u64) -> u32 {
        content_tag(format!("{agent}/{epoch}/{seq}").as_bytes())
    }

    /// Claims with the content every resend of the batch shares.
    fn claim(d: &mut BatchDedup, agent: &str, epoch: u64, seq: u64, tag: u32, now: i64) -> Claim {
        d.claim(agent, epoch, seq, tag, content_of(agent, epoch, seq), now)
    }

    fn lands(d: &mut BatchDedup, agent: &str, epoch: u64, seq: u64, tag: u32) -> bool {
        claim(d, agent, epoch, seq, tag, 0).verdict.lands()
    }

    #[test]
    fn a_batch_identity_reused_with_other_bytes_lands_and_is_reported() {
        // A buffer file restored from a backup keeps its epoch but numbers from an older point: its new batches
        // reuse identities that landed, with other content.
        let mut d = big();
        assert_eq!(
            d.claim("gw", 5, 10, tag("s", "1"), 111, 0).verdict,
            Verdict::New
        );
        let c = d.claim("gw", 5, 10, tag("s", "2"), 222, 0);
        assert_eq!(c.verdict, Verdict::Collision);
        assert!(
            c.verdict.lands(),
            "other bytes are other readings: never skipped"
        );
        assert_eq!(
            c.conflict.map(|c| (c.older, c.newer, c.report)),
            Some((5, 5, true))
        );
        assert_eq!(
            d.claim("gw", 5, 10, tag("s", "3"), 111, 0).verdict,
            Verdict::Resend,
            "the same bytes again in another record are a resend"
        );
    }

    /// The bytes recounted from scratch.
    fn recount(d: &BatchDedup) -> usize {
        d.agents.iter().map(|(id, a)| a.count_bytes(id)).sum()
    }

    #[test]
    fn a_resend_is_skipped_but_a_replay_of_the_same_record_is_not() {
        let mut d = big();
        let (r1, r2) = (tag("shard-1", "100"), tag("shard-2", "100"));
        assert_ne!(r1, r2);
        assert_eq!(claim(&mut d, "a", 7, 1, r1, 0).verdict, Verdict::New);
        assert_eq!(
            claim(&mut d, "a", 7, 1, r1, 0).verdict,
            Verdict::Replay,
            "a replay of the same record lands again"
        );
        assert_eq!(
            claim(&mut d, "a", 7, 1, r2, 0).verdict,
            Verdict::Resend,
            "a resend in another record is skipped"
        );
        assert!(lands(&mut d, "b", 7, 1, r2), "agents are separate");
        assert!(lands(&mut d, "a", 7, 2, r2));
    }

    #[test]
    fn a_new_buffer_epoch_numbering_from_one_again_is_not_taken_for_resends() {
        let mut d = big();
        for seq in 1..=100 {
            assert!(lands(&mut d, "gw", 11, seq, tag("s", &seq.to_string())));
        }
        // Re-imaged: epoch 22 starts at 1 again, in other records.
        for seq in 1..=100 {
            let c = claim(
                &mut d,
                "gw",
                22,
                seq,
                tag("s", &(1000 + seq).to_string()),
                0,
            );
            assert_eq!(c.verdict, Verdict::New, "seq {seq}");
            assert_eq!(c.conflict, None);
        }
    }

    #[test]
    fn a_re_image_with_trailing_batches_is_no_conflict_but_two_live_agents_are() {
        let mut d = big();
        let mut rec = 0u32;
        let mut next = || {
            rec += 1;
            rec
        };
        for seq in 1..=50 {
            claim(&mut d, "gw", 11, seq, next(), 0);
        }
        // The new box starts; the old one's last batches and resends trail for a while.
        for seq in 1..=10 {
            assert_eq!(claim(&mut d, "gw", 22, seq, next(), 0).conflict, None);
        }
        for seq in 45..=55 {
            assert_eq!(
                claim(&mut d, "gw", 11, seq, next(), 0).conflict,
                None,
                "{seq}"
            );
        }
        for seq in 11..=200 {
            assert_eq!(claim(&mut d, "gw", 22, seq, next(), 0).conflict, None);
        }
        // A resend of the old epoch much later is no conflict either.
        assert_eq!(claim(&mut d, "gw", 11, 50, next(), 0).conflict, None);
        // The old epoch landing new batches long after the new one started: two live agents.
        let c = claim(&mut d, "gw", 11, 56, next(), 1_000).conflict;
        assert_eq!(
            c,
            Some(Conflict {
                older: 11,
                newer: 22,
                report: true
            })
        );
        // Counted every time, reported at most once a minute.
        let c = claim(&mut d, "gw", 11, 57, next(), 2_000).conflict.unwrap();
        assert!(!c.report);
        let c = claim(&mut d, "gw", 11, 58, next(), 62_000)
            .conflict
            .unwrap();
        assert!(c.report);
    }

    #[test]
    fn interleaved_epochs_are_a_conflict_once_past_the_grace() {
        let mut d = big();
        let mut conflicts = 0;
        for seq in 1..=100u64 {
            for (epoch, base) in [(5u64, 0u32), (9, 1_000)] {
                if claim(&mut d, "twin", epoch, seq, base + seq as u32, 0)
                    .conflict
                    .is_some()
                {
                    conflicts += 1;
                }
            }
        }
        // Epoch 5 was first: from the grace on, each of its new batches is a conflict.
        assert!(
            conflicts >= 100 - CONFLICT_GRACE as usize / 2 - 1,
            "{conflicts}"
        );
    }

    #[test]
    fn epoch_zero_backlog_after_an_upgrade_is_no_conflict() {
        let mut d = big();
        for seq in 1..=500u64 {
            // Sealed before the upgrade (epoch 0) and after (epoch 3), sent interleaved.
            assert_eq!(
                claim(&mut d, "up", 3, seq + 500, seq as u32, 0).conflict,
                None
            );
            assert_eq!(
                claim(&mut d, "up", 0, seq, 10_000 + seq as u32, 0).conflict,
                None
            );
        }
    }

    #[test]
    fn an_old_epoch_stops_holding_its_window() {
        let mut d = BatchDedup::new(usize::MAX, 1_000);
        claim(&mut d, "gw", 1, 1, 1, 0);
        let before = d.memory_bytes();
        for seq in 1..=1_001 {
            claim(&mut d, "gw", 2, seq, 10 + seq as u32, 0);
        }
        let a = &d.agents["gw"];
        assert!(a.epochs[0].window.is_none(), "old epoch retired");
        assert!(a.epochs[1].window.is_some());
        assert!(d.memory_bytes() > before);
        // A late resend of it is treated as new (never skipped).
        assert!(lands(&mut d, "gw", 1, 1, 9_999));
        // At most MAX_EPOCHS epochs per agent.
        for e in 10..20 {
            claim(&mut d, "gw", e, 1, 1, 0);
        }
        assert_eq!(d.agents["gw"].epochs.len(), MAX_EPOCHS);
        assert_eq!(d.memory_bytes(), recount(&d));
    }

    #[test]
    fn ten_thousand_agents_stay_under_the_bound_and_the_least_recent_are_forgotten() {
        let window = 4_096;
        let max = 64 * agent_bytes_max(window, 1);
        let mut d = BatchDedup::new(max, window);
        let mut evicted = 0;
        for a in 0..10_000u64 {
            for seq in 1..=window + 10 {
                if a % 1000 == 0 || seq <= 3 {
                    evicted += claim(&mut d, &format!("agent-{a}"), 42, seq, 1, 0).evicted;
                }
            }
            assert!(d.memory_bytes() <= max, "{} > {max}", d.memory_bytes());
        }
        assert_eq!(d.memory_bytes(), recount(&d));
        assert!(evicted > 0 && d.agents() < 10_000);
        eprintln!(
            "10,000 agents: {} remembered in {} bytes (bound {max}), {evicted} evicted",
            d.agents(),
            d.memory_bytes()
        );
        // The most recent agent is remembered; the first one was forgotten, so its batches are new again.
        assert_eq!(
            claim(&mut d, "agent-9999", 42, 1, 2, 0).verdict,
            Verdict::Resend
        );
        assert_eq!(claim(&mut d, "agent-1", 42, 1, 2, 0).verdict, Verdict::New);
    }

    #[test]
    fn a_window_grows_only_as_far_as_used() {
        let mut d = BatchDedup::new(usize::MAX, WINDOW);
        claim(&mut d, "small", 1, 1, 1, 0);
        claim(&mut d, "small", 1, 5, 1, 0);
        assert!(
            d.memory_bytes() < AGENT_OVERHEAD + 1024,
            "{}",
            d.memory_bytes()
        );
        for seq in 1..=3 * WINDOW {
            claim(&mut d, "busy", 1, seq, 1, 0);
        }
        let busy = d.agents["busy"].bytes;
        assert!(busy <= agent_bytes_max(WINDOW, 1) + "busy".len(), "{busy}");
        assert_eq!(
            d.agents["busy"].epochs[0]
                .window
                .as_ref()
                .map(|w| w.tags.len()),
            Some(WINDOW as usize)
        );
    }

    /// An operation of the property tests: agent, epoch, seq, record.
    fn ops(agents: u8, seqs: u64) -> impl Strategy<Value = Vec<(u8, u64, u64, u32)>> {
        prop::collection::vec((0..agents, 0u64..3, 0..seqs, 1u32..4), 1..600)
    }

    proptest! {
        /// Without eviction, against a model map: within the window the answer is exact; a batch is never
        /// skipped unless another record landed it.
        #[test]
        fn matches_a_map_within_the_window(ops in ops(4, 600)) {
            let window = 256;
            let mut d = BatchDedup::new(usize::MAX, window);
            let mut model: HashMap<(u8, u64, u64), u32> = HashMap::new();
            let mut high: HashMap<(u8, u64), u64> = HashMap::new();
            for (agent, epoch, seq, t) in ops {
                let h = high.entry((agent, epoch)).or_insert(0);
                let in_window = seq + window > *h;
                let c = claim(&mut d, &agent.to_string(), epoch, seq, t, 0);
                prop_assert_eq!(c.evicted, 0);
                let landed = c.verdict.lands();
                if !in_window {
                    prop_assert!(landed, "below the window a batch is treated as new");
                } else if let Some(first) = model.get(&(agent, epoch, seq)) {
                    prop_assert_eq!(landed, *first == t, "agent {} epoch {} seq {} tag {}", agent, epoch, seq, t);
                } else {
                    prop_assert!(landed);
                    model.insert((agent, epoch, seq), t);
                }
                *h = (*h).max(seq);
            }
        }

        /// Under a small bound with many agents: the bound holds after every claim, the count is exact, and
        /// eviction never makes a batch be skipped that was not landed from another record.
        #[test]
        fn eviction_keeps_the_bound_and_never_skips_an_unlanded_batch(ops in ops(60, 300)) {
            let window = 128;
            let max = 8 * agent_bytes_max(window, MAX_EPOCHS);
            let mut d = BatchDedup::new(max, window);
            // Every record that landed each batch.
            let mut landed_by: HashMap<(u8, u64, u64), Vec<u32>> = HashMap::new();
            let (n, mut evicted) = (ops.len(), 0);
            for (agent, epoch, seq, t) in ops {
                let c = claim(&mut d, &agent.to_string(), epoch, seq, t, 0);
                evicted += c.evicted;
                prop_assert!(d.memory_bytes() <= max);
                prop_assert_eq!(d.memory_bytes(), recount(&d));
                match c.verdict {
                    Verdict::Resend => {
                        let by = landed_by.get(&(agent, epoch, seq));
                        prop_assert!(by.is_some_and(|by| by.iter().any(|f| *f != t)), "skipped a batch no other record landed");
                    }
                    Verdict::Replay => {
                        let by = landed_by.get(&(agent, epoch, seq));
                        prop_assert!(by.is_some_and(|by| by.contains(&t)));
                    }
                    Verdict::New => landed_by.entry((agent, epoch, seq)).or_default().push(t),
                    Verdict::Collision => prop_assert!(false, "one content per batch here: no collision"),
                }
            }
            prop_assert!(n < 400 || evicted > 0, "the bound was never reached");
        }
    }
}
