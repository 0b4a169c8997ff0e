//! The on-disk record framing shared by the spool and the engine's journal:
//! `[len: u32 LE][crc32(seq ‖ payload): u32 LE][seq: u64 LE][payload]`.
//!
//! A record that is short or fails its CRC marks where valid data ends: at the tail of a log
//! that is a write torn by a crash, anywhere else it is corruption.

/// Bytes of a record header: length, CRC, sequence number.
pub const HEADER: usize = 16;

/// Appends one framed record to `buf`.
pub fn encode(buf: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&seq.to_le_bytes());
    crc.update(payload);
    let len = u32::try_from(payload.len()).expect("records are far smaller than 4 GiB");
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// Decodes the record at the start of `b`: its sequence number, payload, and total length.
/// `None` if `b` holds no complete, intact record.
pub fn decode(b: &[u8]) -> Option<(u64, &[u8], usize)> {
    if b.len() < HEADER {
        return None;
    }
    let len = u32::from_le_bytes(b[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(b[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let payload = b.get(HEADER..HEADER.checked_add(len)?)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    (h.finalize() == crc).then_some((seq, payload, HEADER + len))
}

/// Splits `data` into intact records; returns them and the offset where intact data ends.
pub fn decode_all(data: &[u8]) -> (Vec<(u64, &[u8])>, usize) {
    let mut out = Vec::new();
    let mut off = 0;
    while let Some((seq, payload, used)) = decode(&data[off..]) {
        out.push((seq, payload));
        off += used;
    }
    (out, off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_torn_tail() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, b"hello");
        encode(&mut buf, 8, b"");
        let whole = buf.len();
        encode(&mut buf, 9, b"torn");
        buf.truncate(buf.len() - 2);
        let (records, end) = decode_all(&buf);
        assert_eq!(records, vec![(7, &b"hello"[..]), (8, &b""[..])]);
        assert_eq!(end, whole);
        // A flipped payload bit fails the CRC.
        let mut bad = buf.clone();
        bad[HEADER] ^= 1;
        assert!(decode(&bad).is_none());
    }
}
