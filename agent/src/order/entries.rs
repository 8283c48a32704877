//! The remembered readings of one series' dedup state ([`super::SeriesState`]): `(offset, fold)` pairs in
//! event-time order, the offset counting milliseconds from the state's base and the fold being the reading's
//! identity folded to 32 bits. Laid out **short** (6 bytes: a 16-bit offset) while the readings held span at most
//! [`SHORT_MAX`] ms, as those of the default 60 s dedup window do, and **long** (8 bytes: a 32-bit offset)
//! otherwise.
//! The state moves its base and re-lays the entries; this type only holds them.

use std::collections::VecDeque;

/// The largest offset a short entry holds.
pub(super) const SHORT_MAX: u32 = u16::MAX as u32;

/// One entry's layout: the offset and the fold, split into words of its width.
trait Slot: Copy {
    fn new(off: u32, fold: u32) -> Self;
    fn off(self) -> u32;
    fn fold(self) -> u32;
}

impl Slot for [u16; 3] {
    fn new(off: u32, fold: u32) -> Self {
        debug_assert!(off <= SHORT_MAX);
        [off as u16, fold as u16, (fold >> 16) as u16]
    }
    fn off(self) -> u32 {
        u32::from(self[0])
    }
    fn fold(self) -> u32 {
        u32::from(self[1]) | (u32::from(self[2]) << 16)
    }
}

impl Slot for [u32; 2] {
    fn new(off: u32, fold: u32) -> Self {
        [off, fold]
    }
    fn off(self) -> u32 {
        self[0]
    }
    fn fold(self) -> u32 {
        self[1]
    }
}

/// The entries, short or long. Rings: forgetting the oldest moves nothing.
#[derive(Debug, Clone)]
pub(super) enum Entries {
    Short(VecDeque<[u16; 3]>),
    Long(VecDeque<[u32; 2]>),
}

/// Runs `$body` with `$d` bound to the ring, whichever layout.
macro_rules! each {
    ($entries:expr, $d:ident => $body:expr) => {
        match $entries {
            Entries::Short($d) => $body,
            Entries::Long($d) => $body,
        }
    };
}

impl Entries {
    /// No entries, short.
    pub(super) fn new() -> Self {
        Entries::Short(VecDeque::new())
    }

    /// No entries, short or long, with room for `n`.
    pub(super) fn with_capacity(short: bool, n: usize) -> Self {
        if short {
            Entries::Short(VecDeque::with_capacity(n))
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
            Entries::Short(_) => 6,
            Entries::Long(_) => 8,
        }
    }

    /// Laid out short.
    pub(super) fn is_short(&self) -> bool {
        matches!(self, Entries::Short(_))
    }

    /// The largest offset an entry holds.
    pub(super) fn max_off(&self) -> u32 {
        match self {
            Entries::Short(_) => SHORT_MAX,
            Entries::Long(_) => u32::MAX,
        }
    }

    /// Entry `i`'s offset.
    pub(super) fn off(&self, i: usize) -> u32 {
        each!(self, d => d[i].off())
    }

    /// Entry `i`'s fold.
    pub(super) fn fold(&self, i: usize) -> u32 {
        each!(self, d => d[i].fold())
    }

    /// The newest entry's offset.
    pub(super) fn last_off(&self) -> Option<u32> {
        each!(self, d => d.back().map(|e| e.off()))
    }

    /// How many entries, from the oldest, have offsets under `h`.
    pub(super) fn count_below(&self, h: u32) -> usize {
        each!(self, d => d.iter().take_while(|e| e.off() < h).count())
    }

    /// Among the entries of offset `off`, the index of the first that `matches` (given its index and fold), and
    /// whether there is any entry of `off` at all. One pass over one layout: a release looks up every reading.
    pub(super) fn find(
        &self,
        off: u32,
        matches: impl Fn(usize, u32) -> bool,
    ) -> (Option<usize>, bool) {
        each!(self, d => {
            // Readings mostly come newer than everything remembered: no search then.
            if d.back().is_none_or(|e| e.off() < off) {
                return (None, false);
            }
            let first = d.partition_point(|e| e.off() < off);
            let mut any = false;
            for (i, e) in d.range(first..).enumerate() {
                if e.off() != off {
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
        each!(self, d => {
            let e = Slot::new(off, fold);
            if d.back().is_none_or(|x| x.off() <= off) {
                d.push_back(e);
                d.len() - 1
            } else {
                let at = d.partition_point(|x| x.off() <= off);
                d.insert(at, e);
                at
            }
        })
    }

    /// Appends an entry (`off` within [`Entries::max_off`]).
    pub(super) fn push_back(&mut self, off: u32, fold: u32) {
        each!(self, d => d.push_back(Slot::new(off, fold)))
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

    /// Adds `delta` to every offset, in place (each result must fit this layout).
    pub(super) fn shift(&mut self, delta: i64) {
        each!(self, d => {
            for e in d.iter_mut() {
                *e = Slot::new((i64::from(e.off()) + delta) as u32, e.fold());
            }
        })
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
