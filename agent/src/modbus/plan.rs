//! Request coalescing: the points of one poll group and register kind are merged into the fewest read requests,
//! bounded by the protocol limits (125 registers, 2000 bits per request) and a maximum gap of unused registers.
//! Pure; computed once at start and printed by `check-config`.

use serde::Deserialize;

/// The four Modbus data tables.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    /// Read/write bits (function 1).
    Coil,
    /// Read-only bits (function 2).
    Discrete,
    /// Read/write registers (function 3).
    Holding,
    /// Read-only registers (function 4).
    Input,
}

impl Table {
    /// Largest quantity one read request may ask for.
    pub fn max_quantity(self) -> u16 {
        match self {
            Table::Coil | Table::Discrete => 2000,
            Table::Holding | Table::Input => 125,
        }
    }
}

/// One read request and the points it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Table.
    pub table: Table,
    /// First address.
    pub start: u16,
    /// Quantity of registers or bits.
    pub count: u16,
    /// `(point index, offset of the point in the response)`.
    pub points: Vec<(usize, u16)>,
}

/// A point's location: `(point index, table, address, size in registers or bits)`.
pub type Span = (usize, Table, u16, u16);

/// Merges spans (of one poll group) into requests. Spans closer than `max_gap` unused addresses share a
/// request while it stays within the table's limit. Overlapping spans (two points on one register, e.g. two
/// bits) share naturally.
pub fn coalesce(spans: &[Span], max_gap: u16) -> Vec<Request> {
    let mut sorted: Vec<Span> = spans.to_vec();
    sorted.sort_by_key(|&(i, t, a, _)| (t, a, i));
    let mut out: Vec<Request> = Vec::new();
    for (i, t, a, n) in sorted {
        let end = u32::from(a) + u32::from(n);
        if let Some(r) = out.last_mut() {
            let r_end = u32::from(r.start) + u32::from(r.count);
            let new_end = r_end.max(end);
            if r.table == t
                && u32::from(a) <= r_end + u32::from(max_gap)
                && new_end - u32::from(r.start) <= u32::from(t.max_quantity())
            {
                r.count = (new_end - u32::from(r.start)) as u16;
                r.points.push((i, a - r.start));
                continue;
            }
        }
        out.push(Request {
            table: t,
            start: a,
            count: n,
            points: vec![(i, 0)],
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn neighbours_merge_and_gaps_split() {
        let spans = [
            (0, Table::Holding, 0, 2),
            (1, Table::Holding, 2, 2),
            (2, Table::Holding, 10, 1),
            (3, Table::Holding, 40, 4),
            (4, Table::Coil, 0, 1),
        ];
        let r = coalesce(&spans, 10);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].table, r[0].start, r[0].count), (Table::Coil, 0, 1));
        assert_eq!(
            (r[1].start, r[1].count, r[1].points.clone()),
            (0, 11, vec![(0, 0), (1, 2), (2, 10)])
        );
        assert_eq!((r[2].start, r[2].count), (40, 4));
    }

    #[test]
    fn requests_respect_the_protocol_limits() {
        let spans: Vec<Span> = (0..100)
            .map(|i| (i, Table::Holding, (i * 2) as u16, 2))
            .collect();
        let r = coalesce(&spans, 0);
        assert!(r.iter().all(|q| q.count <= 125));
        assert_eq!(r.len(), 2);
    }

    proptest! {
        /// Every point is covered by exactly one request, at the right offset, within the limits.
        #[test]
        fn every_point_is_served_once_within_limits(
            pts in prop::collection::vec((0u8..4, 0u16..600, 1u16..5), 1..80),
            gap in 0u16..30,
        ) {
            let tables = [Table::Coil, Table::Discrete, Table::Holding, Table::Input];
            let spans: Vec<Span> = pts.iter().enumerate().map(|(i, &(t, a, n))| (i, tables[t as usize], a, n)).collect();
            let reqs = coalesce(&spans, gap);
            let mut seen = vec![0; spans.len()];
            for q in &reqs {
                prop_assert!(q.count <= q.table.max_quantity());
                for &(i, off) in &q.points {
                    let (_, t, a, n) = spans[i];
                    prop_assert_eq!(t, q.table);
                    prop_assert_eq!(q.start + off, a);
                    prop_assert!(off + n <= q.count);
                    seen[i] += 1;
                }
            }
            prop_assert!(seen.iter().all(|&s| s == 1));
        }
    }
}
