//! Packing rendered conversations: whole conversations side by side in fixed-length rows,
//! with per-conversation positions and attention spans (segments), for varlen attention.
//!
//! Inputs and targets follow `collate`: a conversation of n ids gives n-1 positions.

use crate::collate::{write_positions, Rows};
use std::collections::BTreeSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Longest first, each into the fullest row it fits (best-fit decreasing).
    BestFit,
    /// In the given order, each into the current row or else a new one (keeps order).
    NextFit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Long {
    /// Keep the first row_len positions of a conversation that has more.
    Truncate,
    /// Cut it into pieces of row_len positions (the last shorter), each its own span with
    /// positions from 0; no target is lost, but later pieces do not see earlier context.
    Split,
}

impl Policy {
    pub fn parse(s: &str) -> Result<Policy, String> {
        match s {
            "best_fit" => Ok(Policy::BestFit),
            "next_fit" => Ok(Policy::NextFit),
            _ => Err(format!("policy must be 'best_fit' or 'next_fit', got {s:?}")),
        }
    }
}

impl Long {
    pub fn parse(s: &str) -> Result<Long, String> {
        match s {
            "truncate" => Ok(Long::Truncate),
            "split" => Ok(Long::Split),
            _ => Err(format!("long must be 'truncate' or 'split', got {s:?}")),
        }
    }
}

/// Packed rows, all arrays [rows, t] row-major except the per-segment ones. A segment is a
/// conversation (or piece of one) or the padding at the end of a row; segments never cross
/// rows, so `cu_seqlens` over the flattened batch are valid flash-attention varlen bounds.
#[derive(Debug, Default)]
pub struct Packed {
    pub rows: usize,
    pub t: usize,
    pub inputs: Vec<i32>,
    pub targets: Vec<i64>,
    /// Position within the segment, from 0.
    pub position_ids: Vec<i32>,
    /// Segment id over the whole batch (padding segments included), rising along the rows.
    pub doc_ids: Vec<i32>,
    /// Segment bounds over the flattened batch: segment s is [cu_seqlens[s], cu_seqlens[s+1]).
    pub cu_seqlens: Vec<i32>,
    pub max_seqlen: usize,
    /// Per segment: the conversation it came from (-1 for padding) and the index in that
    /// conversation's ids of its first input.
    pub seg_conv: Vec<i32>,
    pub seg_start: Vec<i32>,
    /// Conversations not placed because `max_rows` rows were full, in input order.
    pub leftover: Vec<usize>,
    /// Trained targets dropped by `Long::Truncate`.
    pub dropped_targets: usize,
}

#[derive(Clone, Copy)]
struct Piece {
    conv: usize,
    start: usize,
    len: usize,
}

/// Rows with free space, found by remaining capacity.
struct Bins {
    t: usize,
    free: Vec<usize>,
    by_free: BTreeSet<(usize, usize)>,
}

impl Bins {
    fn take(&mut self, row: usize, len: usize) {
        self.by_free.remove(&(self.free[row], row));
        self.free[row] -= len;
        if self.free[row] > 0 {
            self.by_free.insert((self.free[row], row));
        }
    }

    fn give_back(&mut self, row: usize, len: usize) {
        self.by_free.remove(&(self.free[row], row));
        self.free[row] += len;
        self.by_free.insert((self.free[row], row));
    }

    fn open(&mut self) -> usize {
        self.free.push(self.t);
        self.by_free.insert((self.t, self.free.len() - 1));
        self.free.len() - 1
    }

    fn best_fit(&self, len: usize) -> Option<usize> {
        self.by_free.range((len, 0)..).next().map(|&(_, r)| r)
    }
}

/// Packs conversations into rows of `t` positions (see `Policy`, `Long`). Conversations of
/// fewer than 2 ids have no position and are skipped. With `max_rows`, exactly that many rows
/// come back and conversations that do not fit are listed in `leftover` (all pieces of a
/// split conversation are placed, or none).
pub fn pack(
    rows: &Rows,
    t: usize,
    pad_id: u32,
    policy: Policy,
    long: Long,
    max_rows: Option<usize>,
) -> Result<Packed, String> {
    if t == 0 {
        return Err("row_len must be at least 1".into());
    }
    let mut pieces = Vec::with_capacity(rows.len());
    // Trained targets past the cut, per conversation (counted only if it is placed).
    let mut cut = vec![0usize; rows.len()];
    for (conv, cut_conv) in cut.iter_mut().enumerate() {
        let (ids, mask) = rows.row(conv);
        let p = ids.len().saturating_sub(1);
        if p <= t {
            if p > 0 {
                pieces.push(Piece { conv, start: 0, len: p });
            }
            continue;
        }
        match long {
            Long::Truncate => {
                pieces.push(Piece { conv, start: 0, len: t });
                *cut_conv = mask[t + 1..].iter().filter(|&&m| m != 0).count();
            }
            Long::Split => {
                let mut start = 0;
                while start < p {
                    pieces.push(Piece { conv, start, len: t.min(p - start) });
                    start += t;
                }
            }
        }
    }
    if policy == Policy::BestFit {
        // Stable: ties keep input order, so results are deterministic.
        pieces.sort_by_key(|pc| std::cmp::Reverse(pc.len));
    }

    let max_rows = max_rows.unwrap_or(usize::MAX);
    let mut bins = Bins { t, free: Vec::new(), by_free: BTreeSet::new() };
    let mut row_of: Vec<Option<usize>> = vec![None; pieces.len()];
    let mut failed = vec![false; rows.len()];
    for k in 0..pieces.len() {
        let pc = pieces[k];
        if failed[pc.conv] {
            continue;
        }
        let row = match policy {
            Policy::BestFit => bins.best_fit(pc.len),
            Policy::NextFit => bins.free.len().checked_sub(1).filter(|&r| bins.free[r] >= pc.len),
        };
        let row = match row {
            Some(r) => Some(r),
            None if bins.free.len() < max_rows => Some(bins.open()),
            None => None,
        };
        match row {
            Some(r) => {
                bins.take(r, pc.len);
                row_of[k] = Some(r);
            }
            None => {
                failed[pc.conv] = true;
                // Take back the pieces of this conversation placed already.
                for j in 0..k {
                    if pieces[j].conv == pc.conv {
                        if let Some(r) = row_of[j].take() {
                            bins.give_back(r, pieces[j].len);
                        }
                    }
                }
            }
        }
    }

    let n_rows = if max_rows == usize::MAX { bins.free.len() } else { max_rows };
    if n_rows.checked_mul(t).is_none_or(|x| x > i32::MAX as usize) {
        return Err(format!("{n_rows} rows of {t} positions is more than int32 cu_seqlens can index"));
    }
    let mut per_row: Vec<Vec<Piece>> = vec![Vec::new(); n_rows];
    for (k, r) in row_of.iter().enumerate() {
        if let Some(r) = *r {
            per_row[r].push(pieces[k]);
        }
    }
    let size = n_rows * t;
    let mut out = Packed {
        rows: n_rows,
        t,
        inputs: vec![pad_id as i32; size],
        targets: vec![-1; size],
        position_ids: vec![0; size],
        doc_ids: vec![0; size],
        cu_seqlens: vec![0],
        leftover: (0..rows.len()).filter(|&c| failed[c]).collect(),
        dropped_targets: (0..rows.len()).filter(|&c| !failed[c]).map(|c| cut[c]).sum(),
        ..Default::default()
    };
    let mut seg = 0i32;
    for (r, row) in per_row.iter_mut().enumerate() {
        row.sort_by_key(|pc| (pc.conv, pc.start));
        let mut at = r * t;
        let end = at + t;
        let mut segment = |out: &mut Packed, at: usize, len: usize, conv: i32, start: i32| {
            for k in 0..len {
                out.position_ids[at + k] = k as i32;
                out.doc_ids[at + k] = seg;
            }
            out.cu_seqlens.push((at + len) as i32);
            out.seg_conv.push(conv);
            out.seg_start.push(start);
            out.max_seqlen = out.max_seqlen.max(len);
            seg += 1;
        };
        for pc in row.iter() {
            let (ids, mask) = rows.row(pc.conv);
            write_positions(ids, mask, pc.start, pc.len, &mut out.inputs[at..], &mut out.targets[at..]);
            segment(&mut out, at, pc.len, pc.conv as i32, pc.start as i32);
            at += pc.len;
        }
        if at < end {
            segment(&mut out, at, end - at, -1, 0);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collate::tests::make;
    use crate::collate::Rows;

    /// Every trained target of every conversation appears exactly once, in its own span.
    fn check(p: &Packed, lens: &[usize], long: Long) {
        let t = p.t;
        assert_eq!(*p.cu_seqlens.last().unwrap() as usize, p.rows * t);
        let mut seen = vec![vec![false; 5000]; lens.len()];
        for s in 0..p.seg_conv.len() {
            let (a, b) = (p.cu_seqlens[s] as usize, p.cu_seqlens[s + 1] as usize);
            assert!(b > a && a / t == (b - 1) / t, "segment crosses a row");
            for k in a..b {
                assert_eq!(p.position_ids[k] as usize, k - a);
                assert_eq!(p.doc_ids[k], s as i32);
                if p.seg_conv[s] < 0 {
                    assert_eq!(p.targets[k], -1);
                } else {
                    let c = p.seg_conv[s] as usize;
                    let j = p.seg_start[s] as usize + k - a;
                    assert_eq!(p.inputs[k] as usize, 1000 * c + j);
                    if p.targets[k] >= 0 {
                        assert_eq!(p.targets[k] as usize, 1000 * c + j + 1);
                        assert!(!seen[c][j + 1]);
                        seen[c][j + 1] = true;
                    }
                }
            }
        }
        for (c, &n) in lens.iter().enumerate() {
            if p.leftover.contains(&c) {
                continue;
            }
            let kept = if long == Long::Truncate { n.min(t + 1) } else { n };
            for (j, &s) in seen[c].iter().enumerate().take(kept).skip(1) {
                assert_eq!(s, j % 2 == 1, "conv {c} target {j}");
            }
        }
    }

    #[test]
    fn pack_keeps_conversations_apart() {
        let lens = [5, 9, 1, 3, 12, 2, 8, 8, 4, 30, 0];
        let (ids, mask, offs) = make(&lens);
        let rows = Rows::new(&ids, &mask, &offs).unwrap();
        for policy in [Policy::BestFit, Policy::NextFit] {
            for long in [Long::Truncate, Long::Split] {
                let p = pack(&rows, 10, 0, policy, long, None).unwrap();
                check(&p, &lens, long);
                assert_eq!(p.dropped_targets > 0, long == Long::Truncate);
                let p = pack(&rows, 10, 0, policy, long, Some(3)).unwrap();
                assert_eq!(p.rows, 3);
                assert!(!p.leftover.is_empty());
                check(&p, &lens, long);
            }
        }
    }

    #[test]
    fn best_fit_fills_rows() {
        // 6+4, 7+3, 5+5 fit exactly into three rows of 10.
        let lens: Vec<usize> = [6, 7, 5, 4, 3, 5].iter().map(|p| p + 1).collect();
        let (ids, mask, offs) = make(&lens);
        let rows = Rows::new(&ids, &mask, &offs).unwrap();
        let p = pack(&rows, 10, 0, Policy::BestFit, Long::Truncate, None).unwrap();
        assert_eq!(p.rows, 3);
        assert!(p.seg_conv.iter().all(|&c| c >= 0));
    }
}
