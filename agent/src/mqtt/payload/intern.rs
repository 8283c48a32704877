//! Series interning: the readings of one series share one `Arc<Series>`, so mapping a JSON field allocates no
//! key and no tags (a ten-field JSON message used to allocate ten keys, and clone the topic tags ten times).
//!
//! A mapper keeps one [`Interner`] from message to message. It is a cache, never a source of truth: a series
//! looked up is always equal to the key and tags asked for (a hash collision only costs an allocation). It is
//! dropped whole once it holds [`MAX_SERIES`] series or [`MAX_BYTES`] of keys and tags, so its memory is bounded
//! whatever the traffic (callers look up only series within the wire format's limits, at most ~83 KB each).

use fieldlink_proto::Series;
use foldhash::HashMapExt;
use std::hash::BuildHasher;
use std::sync::Arc;

/// Series cached before the cache is dropped (about 100 bytes each with a short key and no tags).
pub(crate) const MAX_SERIES: usize = 16_384;
/// Bytes of keys and tags (plus [`ENTRY_BYTES`] each) cached before the cache is dropped.
pub(crate) const MAX_BYTES: usize = 2 << 20;
/// What an entry costs besides its strings: the `Arc`, the `Series`, the map slot.
const ENTRY_BYTES: usize = 96;

/// Shares the series of a mapper's readings; holds the current message's topic tags.
#[derive(Debug, Default)]
pub struct Interner {
    /// By the hash of (key, tags); a colliding series replaces the entry.
    by_hash: foldhash::HashMap<u64, Arc<Series>>,
    /// What the cached series take (see [`MAX_BYTES`]).
    bytes: usize,
    hasher: foldhash::fast::RandomState,
    /// The current message's topic tags, sorted.
    tags: Vec<(String, String)>,
    /// Readings of the last message mapped (at most [`MAX_READINGS_HINT`]): the next message's readings vector
    /// starts with that room, not grown by doubling while a message is parsed.
    pub(crate) readings_hint: usize,
}

/// Bound of [`Interner::readings_hint`]: a huge message does not make every next one reserve as much.
pub(crate) const MAX_READINGS_HINT: usize = 256;

impl Interner {
    /// Starts a message whose readings get `topic_tags` (a tag the payload itself sets wins, see
    /// [`Interner::merged`]).
    pub fn begin(&mut self, topic_tags: &[(String, String)]) {
        if self.tags.as_slice() != topic_tags {
            // A series has one value per tag name: a name given twice keeps its first value (`topic_tags` gives
            // them sorted, so the smallest).
            self.tags.clear();
            for (name, value) in topic_tags {
                if !self.tags.iter().any(|(n, _)| n == name) {
                    self.tags.push((name.clone(), value.clone()));
                }
            }
            self.tags.sort();
        }
    }

    /// The current message's topic tags (sorted, one per name).
    pub fn tags(&self) -> &[(String, String)] {
        &self.tags
    }

    /// The series `key` with the message's topic tags.
    pub fn get(&mut self, key: &str) -> Arc<Series> {
        let Self {
            by_hash,
            bytes,
            hasher,
            tags,
            ..
        } = self;
        lookup(by_hash, bytes, hasher, key, tags)
    }

    /// The series `key` with exactly `tags` (sorted; see [`Interner::merged`]).
    pub fn get_tagged(&mut self, key: &str, tags: &[(String, String)]) -> Arc<Series> {
        lookup(&mut self.by_hash, &mut self.bytes, &self.hasher, key, tags)
    }

    /// A payload's own `tags` with the message's topic tags added (the payload's win on a name), sorted.
    pub fn merged(&self, tags: &[(String, String)]) -> Vec<(String, String)> {
        let mut out = tags.to_vec();
        for (name, value) in &self.tags {
            if !tags.iter().any(|(n, _)| n == name) {
                out.push((name.clone(), value.clone()));
            }
        }
        out.sort();
        out
    }

    /// Series cached now.
    #[cfg(test)]
    pub(crate) fn cached(&self) -> usize {
        self.by_hash.len()
    }
}

fn lookup(
    by_hash: &mut foldhash::HashMap<u64, Arc<Series>>,
    bytes: &mut usize,
    hasher: &foldhash::fast::RandomState,
    key: &str,
    tags: &[(String, String)],
) -> Arc<Series> {
    let h = hasher.hash_one((key, tags));
    if let Some(s) = by_hash.get(&h) {
        if s.key == key && s.tags == tags {
            return Arc::clone(s);
        }
    }
    let size = ENTRY_BYTES + key.len() + tags.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>();
    if by_hash.len() >= MAX_SERIES || *bytes + size > MAX_BYTES {
        *by_hash = foldhash::HashMap::new();
        *bytes = 0;
    }
    // A colliding entry it replaces stays counted until the next drop: the count only errs high.
    *bytes += size;
    let s = Arc::new(Series {
        key: key.to_owned(),
        tags: tags.to_vec(),
    });
    by_hash.insert(h, Arc::clone(&s));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(t: &[(&str, &str)]) -> Vec<(String, String)> {
        t.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect()
    }

    #[test]
    fn equal_series_share_one_allocation_and_differing_ones_do_not() {
        let mut i = Interner::default();
        i.begin(&[]);
        let (a, b) = (i.get("m/a"), i.get("m/a"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(*a, Series::new("m/a"));
        let c = i.get("m/b");
        assert_eq!(c.key, "m/b");
        i.begin(&tags(&[("site", "muc")]));
        let d = i.get("m/a");
        assert_eq!(d.tags, tags(&[("site", "muc")]));
        assert!(!Arc::ptr_eq(&a, &d));
        let e = i.get_tagged("m/a", &[]);
        assert!(Arc::ptr_eq(&a, &e));
    }

    #[test]
    fn topic_tags_are_sorted_and_a_payload_tag_wins() {
        let mut i = Interner::default();
        i.begin(&tags(&[("site", "muc"), ("line", "3")]));
        assert_eq!(i.get("k").tags, tags(&[("line", "3"), ("site", "muc")]));
        assert_eq!(
            i.merged(&tags(&[("site", "ham")])),
            tags(&[("line", "3"), ("site", "ham")])
        );
    }

    #[test]
    fn a_tag_named_twice_by_the_topic_keeps_its_first_value() {
        let mut i = Interner::default();
        i.begin(&tags(&[("site", "muc"), ("site", "ham"), ("line", "3")]));
        assert_eq!(i.get("k").tags, tags(&[("line", "3"), ("site", "muc")]));
    }

    #[test]
    fn long_series_are_bounded_by_bytes_not_only_by_count() {
        let mut i = Interner::default();
        let long = "x".repeat(1000);
        for n in 0..10_000 {
            i.get(&format!("{long}/{n}"));
            assert!(i.bytes <= MAX_BYTES);
        }
        assert!(i.cached() < 10_000 && i.cached() > 0);
    }

    #[test]
    fn the_cache_is_bounded_and_still_answers_equal_series() {
        let mut i = Interner::default();
        for n in 0..MAX_SERIES * 2 + 7 {
            let key = format!("dev/{n}");
            assert_eq!(i.get(&key).key, key);
            assert!(i.cached() <= MAX_SERIES);
        }
        assert!(i.cached() > 0);
    }
}
