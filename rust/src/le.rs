//! Token ids as little-endian u32 bytes: the form in which id arrays cross into Python (where
//! numpy wraps them without a copy) and come back.

/// Writes `ids` into `dst`, which must hold exactly 4 bytes per id.
pub fn write_u32s(dst: &mut [u8], ids: &[u32]) {
    debug_assert_eq!(dst.len(), ids.len() * 4);
    for (d, x) in dst.chunks_exact_mut(4).zip(ids) {
        d.copy_from_slice(&x.to_le_bytes());
    }
}

pub fn u32s_to_bytes(ids: &[u32]) -> Vec<u8> {
    let mut out = vec![0u8; ids.len() * 4];
    write_u32s(&mut out, ids);
    out
}

/// The u32s of a little-endian buffer; `what` names the buffer in the error.
pub fn bytes_to_u32s(b: &[u8], what: &str) -> Result<Vec<u32>, String> {
    if !b.len().is_multiple_of(4) {
        return Err(format!("{what}: buffer length {} is not a multiple of 4", b.len()));
    }
    Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let ids = [0u32, 1, 256, 0xDEAD_BEEF, u32::MAX];
        let b = u32s_to_bytes(&ids);
        assert_eq!(&b[8..12], &[0, 1, 0, 0]);
        assert_eq!(bytes_to_u32s(&b, "ids").unwrap(), ids);
        assert_eq!(bytes_to_u32s(&[], "ids").unwrap(), Vec::<u32>::new());
        assert_eq!(bytes_to_u32s(&b[..7], "ids").unwrap_err(), "ids: buffer length 7 is not a multiple of 4");
    }
}
