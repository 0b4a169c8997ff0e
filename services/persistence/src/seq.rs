//! Sequence tracking: the highest seq persisted, the highest *contiguous* seq (every seq from 1
//! up to it is stored), and the gaps a batch jumps over.
//!
//! The engine publishes 1, 2, 3, ... with no gaps, so a new seq beyond `last + 1` means events
//! are missing upstream (or still on their way, out of order): a warning and
//! `persistence_sequence_gaps_total`. A redelivery of old seqs never counts, and late events
//! that fill a hole move `contiguous` forward. Persisted seqs above `contiguous` are kept as
//! ranges, so memory grows with the number of open gaps, not with the number of events.

use std::collections::BTreeMap;

/// A run of seqs that a batch jumped over: `from..=to` were missing when it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
}

impl Gap {
    pub fn missing(&self) -> u64 {
        self.to - self.from + 1
    }
}

/// What is persisted, in seq terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqTracker {
    contiguous: u64,
    last: u64,
    /// Persisted runs above `contiguous + 1`: start -> end (inclusive), disjoint and never
    /// adjacent to each other or to `contiguous`.
    islands: BTreeMap<u64, u64>,
}

impl SeqTracker {
    /// A tracker from what the database holds: the contiguous prefix and the runs above it
    /// (in any order; overlapping or touching runs are merged).
    pub fn new(contiguous: u64, runs: &[(u64, u64)]) -> SeqTracker {
        let mut t = SeqTracker {
            contiguous,
            last: contiguous,
            islands: BTreeMap::new(),
        };
        let mut sorted: Vec<(u64, u64)> = runs.iter().copied().filter(|(f, t)| f <= t).collect();
        sorted.sort_unstable();
        for (from, to) in sorted {
            t.last = t.last.max(to);
            if from <= t.contiguous + 1 {
                t.contiguous = t.contiguous.max(to);
                continue;
            }
            match t.islands.iter_mut().next_back() {
                Some((_, end)) if from <= *end + 1 => *end = (*end).max(to),
                _ => {
                    t.islands.insert(from, to);
                }
            }
        }
        // A run that reached back to the prefix may have made the first island adjacent.
        while let Some((&start, &end)) = t.islands.iter().next() {
            if start > t.contiguous + 1 {
                break;
            }
            t.islands.remove(&start);
            t.contiguous = t.contiguous.max(end);
        }
        t
    }

    /// Every seq in `1..=contiguous` is persisted.
    pub fn contiguous(&self) -> u64 {
        self.contiguous
    }

    /// The highest seq persisted.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Number of runs above the contiguous prefix (= holes still open).
    pub fn open_gaps(&self) -> usize {
        self.islands.len()
    }

    /// Records newly persisted seqs (ascending, no duplicates, none persisted before) and
    /// returns the gaps they jumped over.
    pub fn record(&mut self, seqs: &[u64]) -> Vec<Gap> {
        let mut gaps = Vec::new();
        for &s in seqs {
            if s > self.last + 1 {
                gaps.push(Gap {
                    from: self.last + 1,
                    to: s - 1,
                });
            }
            self.insert(s);
        }
        gaps
    }

    fn insert(&mut self, s: u64) {
        self.last = self.last.max(s);
        if s <= self.contiguous {
            return;
        }
        if s == self.contiguous + 1 {
            self.contiguous = s;
            if let Some(end) = self.islands.remove(&(s + 1)) {
                self.contiguous = end;
            }
            return;
        }
        // Merge with the run ending just before `s` and / or the one starting just after.
        let before = self
            .islands
            .range(..s)
            .next_back()
            .map(|(&start, &end)| (start, end));
        if let Some((_, end)) = before
            && end >= s
        {
            return; // already inside a run
        }
        let mut start = s;
        let mut end = s;
        if let Some((b_start, b_end)) = before
            && b_end + 1 == s
        {
            start = b_start;
        }
        if let Some(after_end) = self.islands.remove(&(s + 1)) {
            end = after_end;
        }
        self.islands.insert(start, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_has_no_gaps() {
        let mut t = SeqTracker::new(0, &[]);
        assert_eq!(t.record(&[1, 2, 3]), vec![]);
        assert_eq!(t.record(&[4]), vec![]);
        assert_eq!((t.contiguous(), t.last(), t.open_gaps()), (4, 4, 0));
    }

    #[test]
    fn a_jump_is_one_gap_and_late_events_close_it() {
        let mut t = SeqTracker::new(3, &[]);
        assert_eq!(t.record(&[4, 8, 9]), vec![Gap { from: 5, to: 7 }]);
        assert_eq!((t.contiguous(), t.last(), t.open_gaps()), (4, 9, 1));
        // Filling the hole is not a new gap.
        assert_eq!(t.record(&[6]), vec![]);
        assert_eq!((t.contiguous(), t.open_gaps()), (4, 2));
        assert_eq!(t.record(&[5]), vec![]);
        assert_eq!((t.contiguous(), t.open_gaps()), (6, 1));
        assert_eq!(t.record(&[7]), vec![]);
        assert_eq!((t.contiguous(), t.last(), t.open_gaps()), (9, 9, 0));
        assert_eq!(t.record(&[12]), vec![Gap { from: 10, to: 11 }]);
        assert_eq!(Gap { from: 10, to: 11 }.missing(), 2);
    }

    #[test]
    fn built_from_database_runs() {
        let t = SeqTracker::new(10, &[(11, 12), (15, 20)]);
        assert_eq!((t.contiguous(), t.last(), t.open_gaps()), (12, 20, 1));
        let t = SeqTracker::new(0, &[]);
        assert_eq!((t.contiguous(), t.last()), (0, 0));
        let t = SeqTracker::new(0, &[(5, 6), (1, 3), (7, 7), (10, 10)]);
        assert_eq!((t.contiguous(), t.last(), t.open_gaps()), (3, 10, 2));
    }
}
