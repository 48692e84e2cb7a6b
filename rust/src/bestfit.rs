//! BOS-aligned best-fit packing of pretraining documents into rows (nanochat's 2026 loader, 92d63d4).
//!
//! Every row starts at the start of a document (documents arrive with BOS in front), so every
//! token can attend back to its document's BOS. Documents wait in a buffer; each row is filled
//! by repeatedly taking the LARGEST buffered document that fits the space left; when none fits,
//! the SHORTEST one is cropped to fill the row exactly and its rest is dropped. Rows are never
//! padded. Before every placement the buffer is topped up to `min_buffer` documents, so the
//! caller feeds documents whenever `fill` stops and reports it needs more.
//!
//! Ties go to the earliest buffered document (its arrival order), so the rows are a pure
//! function of the document stream and of when documents were fed.

/// One buffered document: its ids and the caller's tag (where to find it again on resume).
struct Doc {
    ids: Vec<u32>,
    tag: u64,
}

pub struct BestFit {
    row_capacity: usize,
    min_buffer: usize,
    docs: Vec<Doc>,
    /// The row being filled (fewer than row_capacity ids).
    row: Vec<u32>,
    /// Finished rows, row_capacity ids each, oldest first.
    done: Vec<u32>,
    /// Ids of placed documents, and ids dropped by crops.
    pub placed_tokens: u64,
    pub cropped_tokens: u64,
}

/// Why `fill` stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// `rows` finished rows are ready.
    Ready,
    /// The buffer is below `min_buffer`: feed documents, then call `fill` again.
    NeedDocs,
}

impl BestFit {
    pub fn new(row_capacity: usize, min_buffer: usize) -> Result<BestFit, String> {
        if row_capacity == 0 || min_buffer == 0 {
            return Err(format!(
                "row capacity and buffer size must be at least 1, got {row_capacity} and {min_buffer}"
            ));
        }
        Ok(BestFit {
            row_capacity,
            min_buffer,
            docs: Vec::new(),
            row: Vec::new(),
            done: Vec::new(),
            placed_tokens: 0,
            cropped_tokens: 0,
        })
    }

    /// Buffers one document; empty documents have nothing to place and are skipped.
    pub fn push(&mut self, ids: &[u32], tag: u64) {
        if !ids.is_empty() {
            self.docs.push(Doc { ids: ids.to_vec(), tag });
        }
    }

    /// Places documents until `rows` finished rows are waiting or the buffer needs documents.
    pub fn fill(&mut self, rows: usize) -> Fill {
        while self.done.len() < rows * self.row_capacity {
            if self.docs.len() < self.min_buffer {
                return Fill::NeedDocs;
            }
            self.place_one();
        }
        Fill::Ready
    }

    fn place_one(&mut self) {
        let remaining = self.row_capacity - self.row.len();
        let mut best: Option<(usize, usize)> = None; // (index, len) of the largest that fits
        for (i, d) in self.docs.iter().enumerate() {
            let n = d.ids.len();
            if n <= remaining && best.is_none_or(|(_, b)| n > b) {
                best = Some((i, n));
            }
        }
        match best {
            Some((i, n)) => {
                let d = self.docs.remove(i);
                self.row.extend_from_slice(&d.ids);
                self.placed_tokens += n as u64;
            }
            None => {
                // nothing fits: crop the shortest (least waste) to fill the row exactly
                let (i, _) =
                    self.docs.iter().enumerate().min_by_key(|(_, d)| d.ids.len()).expect("buffer is not empty");
                let d = self.docs.remove(i);
                self.row.extend_from_slice(&d.ids[..remaining]);
                self.placed_tokens += remaining as u64;
                self.cropped_tokens += (d.ids.len() - remaining) as u64;
            }
        }
        if self.row.len() == self.row_capacity {
            self.done.append(&mut self.row);
        }
    }

    /// Takes the `rows` oldest finished rows, [rows, row_capacity] row-major.
    pub fn take(&mut self, rows: usize) -> Result<Vec<u32>, String> {
        let n = rows * self.row_capacity;
        if n > self.done.len() {
            return Err(format!("{rows} rows asked for, {} ready", self.done.len() / self.row_capacity));
        }
        Ok(self.done.drain(..n).collect())
    }

    /// Tags of the buffered documents, in buffer order.
    pub fn tags(&self) -> Vec<u64> {
        self.docs.iter().map(|d| d.tag).collect()
    }

    /// Whether no row is half filled (the state is then just the buffer and the stream cursor).
    pub fn at_row_boundary(&self) -> bool {
        self.row.is_empty()
    }

    pub fn buffered(&self) -> usize {
        self.docs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain algorithm, written as directly as possible: refill (`chunk` docs at a time)
    /// before each placement, largest fit else crop the shortest.
    fn reference(docs: &[Vec<u32>], cap: usize, min_buffer: usize, chunk: usize, rows: usize) -> Vec<u32> {
        let mut buf: Vec<Vec<u32>> = Vec::new();
        let mut next = 0;
        let mut out = Vec::new();
        for _ in 0..rows {
            let mut row: Vec<u32> = Vec::new();
            while row.len() < cap {
                while buf.len() < min_buffer {
                    for _ in 0..chunk {
                        buf.push(docs[next % docs.len()].clone());
                        next += 1;
                    }
                }
                let rem = cap - row.len();
                let mut best: Option<usize> = None;
                for (i, d) in buf.iter().enumerate() {
                    if d.len() <= rem && best.is_none_or(|b| d.len() > buf[b].len()) {
                        best = Some(i);
                    }
                }
                match best {
                    Some(i) => row.extend(buf.remove(i)),
                    None => {
                        let mut s = 0;
                        for i in 1..buf.len() {
                            if buf[i].len() < buf[s].len() {
                                s = i;
                            }
                        }
                        let d = buf.remove(s);
                        row.extend_from_slice(&d[..rem]);
                    }
                }
            }
            out.extend(row);
        }
        out
    }

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn matches_the_plain_algorithm_on_random_lengths() {
        let mut seed = 7u64;
        for trial in 0..20 {
            let cap = 8 + (lcg(&mut seed) % 60) as usize;
            let docs: Vec<Vec<u32>> = (0..50)
                .map(|d| {
                    let n = 1 + (lcg(&mut seed) % (2 * cap as u64)) as usize;
                    (0..n).map(|k| (d * 1000 + k) as u32).collect()
                })
                .collect();
            let (min_buffer, chunk, rows) = (1 + trial % 9, 1 + trial % 4, 12);
            let mut p = BestFit::new(cap, min_buffer).unwrap();
            let mut next = 0;
            while p.fill(rows) == Fill::NeedDocs {
                for _ in 0..chunk {
                    p.push(&docs[next % docs.len()], next as u64);
                    next += 1;
                }
            }
            let got = p.take(rows).unwrap();
            assert_eq!(got, reference(&docs, cap, min_buffer, chunk, rows), "trial {trial}");
            assert_eq!(p.placed_tokens, (rows * cap) as u64);
        }
    }

    #[test]
    fn rows_start_at_documents_and_crops_are_counted() {
        // cap 5: [3] then [2] fits; [9] is cropped to a row of its own, 4 ids dropped
        let mut p = BestFit::new(5, 1).unwrap();
        p.push(&[10, 11, 12], 0);
        p.push(&[20, 21], 1);
        assert_eq!(p.fill(1), Fill::Ready);
        p.push(&[30, 31, 32, 33, 34, 35, 36, 37, 38], 2);
        assert_eq!(p.fill(2), Fill::Ready);
        assert_eq!(p.take(2).unwrap(), vec![10, 11, 12, 20, 21, 30, 31, 32, 33, 34]);
        assert_eq!((p.placed_tokens, p.cropped_tokens), (10, 4));
        assert!(p.take(1).is_err() && p.at_row_boundary() && p.buffered() == 0);
        assert!(BestFit::new(0, 1).is_err());
    }
}
