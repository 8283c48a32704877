//! The remembered readings of one series' dedup state ([`super::SeriesState`]): `(offset, fold)` pairs in
//! event-time order, the offset counting milliseconds from the state's base and the fold being the reading's
//! identity folded to 32 bits. Laid out **short** (6 bytes: a 16-bit offset) while the readings held span at most
//! [`SHORT_MAX`] ms, as those of the default 60 s dedup window do, and **long** (8 bytes: a 32-bit offset)
//! otherwise.
//! The state moves its base and re-lays the entries; this type only holds them. A short entry holds its offset
//! plus a per-ring `zero`, modulo 2^16: moving the base of short entries changes `zero` only, not each entry (a
//! state at a 60 s window moves its base every ~5.5 s of event time: a pass over every entry cost the pipeline ~5 %).

use std::collections::VecDeque;

/// The largest offset a short entry holds.
pub(super) const SHORT_MAX: u32 = u16::MAX as u32;

/// One entry's layout: the offset (stored plus `zero`, in the layout's width) and the fold, split into words of
/// its width.
trait Slot: Copy {
    fn new(off: u32, fold: u32, zero: u16) -> Self;
    fn off(self, zero: u16) -> u32;
    fn fold(self) -> u32;
}

impl Slot for [u16; 3] {
    fn new(off: u32, fold: u32, zero: u16) -> Self {
        debug_assert!(off <= SHORT_MAX);
        [
            (off as u16).wrapping_add(zero),
            fold as u16,
            (fold >> 16) as u16,
        ]
    }
    fn off(self, zero: u16) -> u32 {
        u32::from(self[0].wrapping_sub(zero))
    }
    fn fold(self) -> u32 {
        u32::from(self[1]) | (u32::from(self[2]) << 16)
    }
}

/// Long entries hold their offset as it is (`zero` is 0).
impl Slot for [u32; 2] {
    fn new(off: u32, fold: u32, _zero: u16) -> Self {
        [off, fold]
    }
    fn off(self, _zero: u16) -> u32 {
        self[0]
    }
    fn fold(self) -> u32 {
        self[1]
    }
}

/// The entries, short or long. Rings: forgetting the oldest moves nothing.
#[derive(Debug, Clone)]
pub(super) enum Entries {
    /// The ring and its `zero`.
    Short(VecDeque<[u16; 3]>, u16),
    Long(VecDeque<[u32; 2]>),
}

/// Runs `$body` with `$d` bound to the ring and `$z` to its `zero` (0 for long entries), whichever layout.
macro_rules! each {
    ($entries:expr, $d:ident, $z:ident => $body:expr) => {
        match $entries {
            Entries::Short($d, z) => {
                let $z: u16 = *z;
                $body
            }
            Entries::Long($d) => {
                let $z: u16 = 0;
                $body
            }
        }
    };
    ($entries:expr, $d:ident => $body:expr) => {
        match $entries {
            Entries::Short($d, _) => $body,
            Entries::Long($d) => $body,
        }
    };
}

impl Entries {
    /// No entries, short.
    pub(super) fn new() -> Self {
        Entries::Short(VecDeque::new(), 0)
    }

    /// No entries, short or long, with room for `n`.
    pub(super) fn with_capacity(short: bool, n: usize) -> Self {
        if short {
            Entries::Short(VecDeque::with_capacity(n), 0)
        } else {
            Entries::Long(VecDeque::with_capacity(n))
        }
    }

    pub(super) fn len(&self) -> usize {
        each!(self, d => d.len())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries the allocation holds.
    pub(super) fn capacity(&self) -> usize {
        each!(self, d => d.capacity())
    }

    /// Bytes per entry.
    pub(super) fn entry_bytes(&self) -> usize {
        match self {
            Entries::Short(..) => 6,
            Entries::Long(_) => 8,
        }
    }

    /// Laid out short.
    pub(super) fn is_short(&self) -> bool {
        matches!(self, Entries::Short(..))
    }

    /// The largest offset an entry holds.
    pub(super) fn max_off(&self) -> u32 {
        match self {
            Entries::Short(..) => SHORT_MAX,
            Entries::Long(_) => u32::MAX,
        }
    }

    /// Entry `i`'s offset.
    pub(super) fn off(&self, i: usize) -> u32 {
        each!(self, d, z => d[i].off(z))
    }

    /// Entry `i`'s fold.
    pub(super) fn fold(&self, i: usize) -> u32 {
        each!(self, d => d[i].fold())
    }

    /// The newest entry's offset.
    pub(super) fn last_off(&self) -> Option<u32> {
        each!(self, d, z => d.back().map(|e| e.off(z)))
    }

    /// How many entries, from the oldest, have offsets under `h`.
    pub(super) fn count_below(&self, h: u32) -> usize {
        each!(self, d, z => d.iter().take_while(|e| e.off(z) < h).count())
    }

    /// Among the entries of offset `off`, the index of the first that `matches` (given its index and fold), and
    /// whether there is any entry of `off` at all. One pass over one layout: a release looks up every reading.
    pub(super) fn find(
        &self,
        off: u32,
        matches: impl Fn(usize, u32) -> bool,
    ) -> (Option<usize>, bool) {
        each!(self, d, z => {
            // Readings mostly come newer than everything remembered: no search then.
            if d.back().is_none_or(|e| e.off(z) < off) {
                return (None, false);
            }
            let first = d.partition_point(|e| e.off(z) < off);
            let mut any = false;
            for (i, e) in d.range(first..).enumerate() {
                if e.off(z) != off {
                    break;
                }
                if matches(first + i, e.fold()) {
                    return (Some(first + i), true);
                }
                any = true;
            }
            (None, any)
        })
    }

    /// Adds an entry after those of offsets up to `off` (`off` within [`Entries::max_off`]); returns its index.
    pub(super) fn push(&mut self, off: u32, fold: u32) -> usize {
        each!(self, d, z => {
            let e = Slot::new(off, fold, z);
            if d.back().is_none_or(|x| x.off(z) <= off) {
                d.push_back(e);
                d.len() - 1
            } else {
                let at = d.partition_point(|x| x.off(z) <= off);
                d.insert(at, e);
                at
            }
        })
    }

    /// Appends an entry (`off` within [`Entries::max_off`]).
    pub(super) fn push_back(&mut self, off: u32, fold: u32) {
        each!(self, d, z => d.push_back(Slot::new(off, fold, z)))
    }

    pub(super) fn remove(&mut self, at: usize) {
        each!(self, d => {
            d.remove(at);
        })
    }

    /// Removes the oldest `n` entries.
    pub(super) fn drain_front(&mut self, n: usize) {
        each!(self, d => {
            d.drain(..n);
        })
    }

    pub(super) fn shrink_to(&mut self, n: usize) {
        each!(self, d => d.shrink_to(n))
    }

    pub(super) fn reserve_exact(&mut self, n: usize) {
        each!(self, d => d.reserve_exact(n))
    }

    /// Adds `delta` to every offset (each result must fit this layout): for short entries, only their `zero`
    /// moves (offsets are read modulo 2^16).
    pub(super) fn shift(&mut self, delta: i64) {
        match self {
            Entries::Short(_, zero) => *zero = zero.wrapping_sub(delta as u16),
            Entries::Long(d) => {
                for e in d.iter_mut() {
                    e[0] = (i64::from(e[0]) + delta) as u32;
                }
            }
        }
    }

    /// The same entries laid out short or long, with `delta` added to every offset (each result must fit),
    /// and room for `room` more.
    pub(super) fn relaid(&self, short: bool, delta: i64, room: usize) -> Self {
        let mut out = Self::with_capacity(short, self.len() + room);
        for i in 0..self.len() {
            out.push_back((i64::from(self.off(i)) + delta) as u32, self.fold(i));
        }
        out
    }
}
