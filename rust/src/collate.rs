//! Training rows from rendered conversations (ids + mask), SFT collation: every conversation
//! padded to the longest in the batch (packing, the alternative, is in `pack`).
//!
//! A conversation of n ids gives n-1 (input, target) positions: inputs ids[:-1], targets
//! ids[1:], a target being -1 where mask[1:] is 0. Padding has target -1.

/// Flattened conversations: conversation i is `ids[offsets[i]..offsets[i + 1]]`.
pub struct Rows<'a> {
    pub ids: &'a [u32],
    pub mask: &'a [u8],
    pub offsets: &'a [usize],
}

impl<'a> Rows<'a> {
    pub fn new(ids: &'a [u32], mask: &'a [u8], offsets: &'a [usize]) -> Result<Rows<'a>, String> {
        if ids.len() != mask.len() {
            return Err(format!("ids has {} tokens but mask has {}", ids.len(), mask.len()));
        }
        if offsets.first() != Some(&0) || offsets.last() != Some(&ids.len()) || offsets.windows(2).any(|w| w[0] > w[1])
        {
            return Err("offsets must rise from 0 to the number of tokens".into());
        }
        Ok(Rows { ids, mask, offsets })
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn row(&self, i: usize) -> (&'a [u32], &'a [u8]) {
        let (a, b) = (self.offsets[i], self.offsets[i + 1]);
        (&self.ids[a..b], &self.mask[a..b])
    }
}

#[inline]
fn target(ids: &[u32], mask: &[u8], j: usize) -> i64 {
    if mask[j] == 0 {
        -1
    } else {
        ids[j] as i64
    }
}

/// Positions j of a conversation (input ids[j], target ids[j+1]) written at `inputs[at..]`.
#[inline]
pub fn write_positions(ids: &[u32], mask: &[u8], from: usize, len: usize, inputs: &mut [i32], targets: &mut [i64]) {
    for k in 0..len {
        let j = from + k;
        inputs[k] = ids[j] as i32;
        targets[k] = target(ids, mask, j + 1);
    }
}

/// `inputs` and `targets`, both [b, l] row-major.
pub struct Collated {
    pub b: usize,
    pub l: usize,
    pub inputs: Vec<i32>,
    pub targets: Vec<i64>,
}

/// Pads each conversation to the longest: l = min(max n, max_len) - 1; a conversation longer
/// than `max_len` ids keeps its first `max_len`.
pub fn collate_sft(rows: &Rows, pad_id: u32, max_len: Option<usize>) -> Collated {
    let cap = max_len.unwrap_or(usize::MAX);
    let longest = (0..rows.len()).map(|i| rows.row(i).0.len().min(cap)).max().unwrap_or(0);
    let l = longest.saturating_sub(1);
    let b = rows.len();
    let mut inputs = vec![pad_id as i32; b * l];
    let mut targets = vec![-1i64; b * l];
    for i in 0..b {
        let (ids, mask) = rows.row(i);
        let n = ids.len().min(cap).saturating_sub(1);
        write_positions(ids, mask, 0, n, &mut inputs[i * l..], &mut targets[i * l..]);
    }
    Collated { b, l, inputs, targets }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Conversations of the given lengths; id = 1000*conv + position, every other token trained.
    pub(crate) fn make(lens: &[usize]) -> (Vec<u32>, Vec<u8>, Vec<usize>) {
        let (mut ids, mut mask, mut offs) = (vec![], vec![], vec![0]);
        for (c, &n) in lens.iter().enumerate() {
            for j in 0..n {
                ids.push((1000 * c + j) as u32);
                mask.push((j % 2) as u8);
            }
            offs.push(ids.len());
        }
        (ids, mask, offs)
    }

    #[test]
    fn collate_pads_and_masks() {
        let (ids, mask, offs) = make(&[4, 2, 1]);
        let rows = Rows::new(&ids, &mask, &offs).unwrap();
        let c = collate_sft(&rows, 7, None);
        assert_eq!((c.b, c.l), (3, 3));
        assert_eq!(c.inputs, vec![0, 1, 2, 1000, 7, 7, 7, 7, 7]);
        assert_eq!(c.targets, vec![1, -1, 3, 1001, -1, -1, -1, -1, -1]);
        let c = collate_sft(&rows, 7, Some(3));
        assert_eq!(c.l, 2);
        assert_eq!(c.targets, vec![1, -1, 1001, -1, -1, -1]);
    }
}
